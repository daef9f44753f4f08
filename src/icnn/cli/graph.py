"""``icnn graph``: mine a pretrained CNN's conv-layers into an explanatory graph (Zhang et al.,
AAAI 2018; survey §4.3), evaluate its nodes against the raw filters and draw them.

The network is ``--arch A [--weights W]`` (an ordinary backbone, e.g. ImageNet weights) or
``--checkpoint RUN`` (a run of ``icnn train``). Writes into ``--out DIR``::

    settings.json     what the features depend on (network, data, layers); a rerun must match it
    features/         the layers' maps of the object crops (icnn.graph.extract_features)
    graph/            the graph (graph.json + layer_<l>.safetensors), saved after every layer
    metrics.json      location instability (nodes vs raw filters, with the references) and
                      few-shot part localisation, when the dataset has landmarks
    report.html       the top nodes' image patches and the strongest edges

Resumable: rerun the same command and the features and the layers already learned are reused; a
different network, data or graph setting into the same DIR is an error. Every graph flag is a field
of :class:`icnn.graph.GraphConfig`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from . import UsageError
from ._common import add_command
from ._flags import add_config_flags, build, flag_of, given

MODEL_FIELDS = ("arch", "weights", "image_size")
DATA_FIELDS = ("dataset", "root", "negatives_root", "dataset_kwargs")
EVAL_KEYS = ("top_units", "top_images", "shots")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from icnn.graph import GraphConfig
    from icnn.training import TrainConfig

    p = add_command(
        subparsers, "graph", run,
        help="mine a pretrained CNN's conv-layers into an explanatory graph of part patterns; evaluate and draw it",
        description="Explanatory graphs (Zhang et al., AAAI 2018): every filter of a few conv-layers gets several nodes, each a "
        "part pattern with a mean position, a deformation range and parents in the layer above, learned top-down "
        "without annotations from the maps of the dataset's object images. Writes OUT/graph/, OUT/metrics.json "
        "(node vs raw-filter location instability, few-shot part localisation) and OUT/report.html; a rerun resumes.",
    )
    p.add_argument("--checkpoint", metavar="RUN", help="a run directory of `icnn train` (instead of --arch/--weights)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (resumable: rerun the same command)")
    p.add_argument("--split", default="train", choices=("train", "fit", "val", "test"), help="the dataset split whose object images the graph is learned on (default train)")
    p.add_argument("--layers", metavar="NAMES", help="comma-separated module names, bottom to top (default: the arch's, see docs/graph.md; names as in `icnn layers`)")
    p.add_argument("--max-images", type=int, metavar="N", help="learn on the first N object images (default: all)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass of the feature extraction (default 16)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader worker processes (default 0)")
    p.add_argument("--eval-source", default="records", choices=("records", "match"),
                   help="records: the positions of the last learning iteration (the authors' code); match: match the images to the frozen graph (default records)")  # fmt: skip
    p.add_argument("--top-units", type=int, default=167, metavar="N", help="units per layer in the location instability (default 167, the authors')")
    p.add_argument("--top-images", type=int, default=20, metavar="N", help="top images per unit in the location instability (default 20)")
    p.add_argument("--shots", type=int, default=3, metavar="N", help="annotated images per trial of the few-shot part localisation (default 3)")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto (cuda when available), cpu, cuda or cuda:N: the feature extraction (default auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_config_flags(p, TrainConfig, only=MODEL_FIELDS + DATA_FIELDS, defaults={"arch": None},
                     group="network and data (with --checkpoint: the run's, data overridable)")  # fmt: skip
    add_config_flags(p, GraphConfig, group="graph (icnn.graph.GraphConfig)")
    return p


def _network(args: argparse.Namespace, device: str):
    """``(model, TrainConfig)``: the run's network, or a fresh ordinary ``--arch`` with ``--weights``."""
    import torch

    import icnn
    from icnn.training import TrainConfig

    flags = {k: v for k, v in given(args, TrainConfig).items() if k in MODEL_FIELDS + DATA_FIELDS}
    if args.checkpoint is not None:
        from .evaluate import load_run

        clash = [k for k in MODEL_FIELDS if k in flags]
        if clash:
            raise UsageError(f"{flag_of(clash[0])}: not with --checkpoint (the run fixes the network)")
        model, cfg, _ = load_run(args.checkpoint, device)
        base = cfg.to_dict()
        if flags.get("dataset", cfg.dataset) != cfg.dataset:
            base.update(root=None, dataset_kwargs={})
        return model, build(TrainConfig, flags=flags, base=base)
    if "arch" not in flags or flags["arch"] is None:
        raise UsageError("--arch: needed (or --checkpoint RUN)")
    cfg = build(TrainConfig, flags={"interpretable": False, **flags})
    torch.manual_seed(0)  # random-init layers (no weights) are the same on every run
    model = icnn.build_model(cfg.arch, num_classes=1, interpretable=False, weights=cfg.weights, image_size=cfg.image_size)
    return model.to(device), cfg


def _settings(args: argparse.Namespace, cfg, layers) -> dict:
    s = {"checkpoint": None if args.checkpoint is None else str(Path(args.checkpoint).resolve()), "split": args.split,
         "layers": list(layers), "max_images": args.max_images}  # fmt: skip
    s.update({k: getattr(cfg, k) for k in MODEL_FIELDS + DATA_FIELDS})
    for k in ("root", "negatives_root"):
        s[k] = None if s[k] is None else str(Path(s[k]).resolve())
    return json.loads(json.dumps(s))  # tuples -> lists: comparable with the file


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "settings.json"
    computed = (out / "graph").exists() or (out / "features").exists()
    if not computed:  # nothing was computed under the saved settings (e.g. the extraction failed): they do not bind
        return
    if not path.exists():
        raise UsageError(f"--out {out}: holds a graph or features but no settings.json; use a new directory")
    saved = json.loads(path.read_text())
    for k, v in settings.items():
        if saved.get(k) != v:
            flag = {"dataset_kwargs": "--dataset-option", "negatives_root": "--negatives"}.get(k, "--" + k.replace("_", "-"))
            raise UsageError(f"{flag}: --out {out} holds a graph of {k} = {saved.get(k)!r}, not {v!r}; use a new directory")


def run(args: argparse.Namespace) -> int:
    from icnn import __version__
    from icnn.evaluate import json_safe
    from icnn.graph import (
        FeatureStore,
        GraphConfig,
        GraphError,
        default_layers,
        evaluate_graph,
        extract_features,
        learn_graph,
    )
    from icnn.report import write_report
    from icnn.report.graph import graph_section
    from icnn.training.checkpoint import atomic_write_json, output_dir
    from icnn.training.classify import build_dataset_for
    from icnn.training.loop import resolve_device

    gcfg = build(GraphConfig, flags=given(args, GraphConfig))
    for name in ("max_images", "batch_size", "top_units", "top_images", "shots"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be >= 1")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: must be >= 0")
    out = output_dir(args.out)
    device = resolve_device(args.device)
    model, cfg = _network(args, device)
    try:
        layers = tuple(t.strip() for t in args.layers.split(",") if t.strip()) if args.layers else default_layers(model)
    except GraphError as exc:
        raise UsageError(f"--layers: {exc}") from None
    settings = _settings(args, cfg, layers)
    _check_settings(out, settings)
    dataset = build_dataset_for(cfg, args.split)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "settings.json", settings)

    try:
        store = FeatureStore(out / "features")
        print(f"features: reusing {out / 'features'} ({store.num_images} images)")
    except GraphError:
        partial = out / "features.partial"
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted extraction
        extract_features(model, dataset, partial, layers=layers, max_images=args.max_images, batch_size=args.batch_size,
                         workers=args.workers, device=device, progress_bar=args.progress)  # fmt: skip
        shutil.rmtree(out / "features", ignore_errors=True)
        partial.rename(out / "features")
        store = FeatureStore(out / "features")
    try:
        graph = learn_graph(store, out / "graph", gcfg, progress_bar=args.progress)
    except GraphError as exc:
        if exc.field in GraphConfig.field_names():
            raise UsageError(f"{flag_of(exc.field)}: {exc.reason}") from None
        raise

    metrics: dict | None = None
    try:
        metrics = evaluate_graph(graph, store, source=args.eval_source, progress_bar=args.progress,
                                 **{k: getattr(args, k) for k in EVAL_KEYS})  # fmt: skip
    except GraphError as exc:
        if not str(exc).startswith(("landmarks", "shots")):
            raise
        print(f"icnn: note: no evaluation ({exc})", file=sys.stderr)
    nodes = [n.num_nodes for n in graph.nodes]
    record = {"metrics": metrics, "nodes": dict(zip([L.name for L in graph.layers], nodes)), "images": store.num_images,
              "config": gcfg.to_dict(), "settings": settings, "seconds": sum(h["seconds"] for h in graph.history),
              "icnn_version": __version__}  # fmt: skip
    atomic_write_json(out / "metrics.json", json_safe(record))
    section = graph_section(graph, store, dataset, metrics)
    write_report(out / "report.html", f"icnn graph: {cfg.arch}", [section], config=gcfg.to_dict(),
                 meta={"network": settings["checkpoint"] or f"{cfg.arch} ({cfg.weights or 'random init'})",
                       "dataset": f"{cfg.dataset} ({args.split})", "images": store.num_images,
                       "layers": ", ".join(layers)})  # fmt: skip
    from icnn.metrics.instability import references_text

    line = f"graph: {sum(nodes)} nodes on {len(nodes)} layers, {store.num_images} images"
    if metrics is not None:
        li = metrics["location_instability"]
        line += (f"; location instability: nodes {li['nodes']:.4f}, raw filters {li['raw_filters']:.4f} ({li['ratio']:.2f}x), "
                 f"{references_text(li)}")  # fmt: skip
    print(line)
    print(f"wrote {out / 'graph'}, {out / 'metrics.json'} and {out / 'report.html'}")
    return 0
