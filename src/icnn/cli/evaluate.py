"""``icnn evaluate``: every metric a dataset's annotations allow, for one trained network."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import UsageError


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Evaluation flags shared by ``evaluate`` and ``compare``."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-batch-size", type=int, default=32, metavar="N", help="images per evaluation batch (default 32)")
    g.add_argument("--rf-mode", choices=("upsample", "rf"), default="upsample",
                   help="part regions: bilinear upsampling (Network Dissection, default) or a round RF per activated unit (paper footnote)")
    g.add_argument("--top-k", type=int, default=100, metavar="N", help="images per filter and landmark for location instability (paper: 100)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="cache the evaluated layer's maps on disk here instead of in memory (large datasets)")


def eval_config(args: argparse.Namespace, device: str, layer: str = "new"):
    from icnn.evaluate import EvalConfig

    for flag, value in (("--eval-batch-size", args.eval_batch_size), ("--top-k", args.top_k)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be a positive integer")
    return EvalConfig(layer=layer, batch_size=args.eval_batch_size, device=device, top_k=args.top_k, rf_mode=args.rf_mode,
                      cache_dir=args.cache_dir, progress=sys.stderr.isatty())


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="measure a trained network's interpretability and write metrics.json + report.html",
        description=(
            "Stream a dataset once through a trained network (a checkpoint of `icnn train`) and compute every "
            "metric its annotations allow: accuracy, location instability with its random-unit and best-fixed-unit "
            "references (landmarks), part interpretability and Network-Dissection IoU (part masks). Writes "
            "OUT/metrics.json and a self-contained OUT/report.html."
        ),
    )
    p.set_defaults(func=run)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a run directory of `icnn train` or its checkpoint/ directory")
    p.add_argument("--dataset", default=None, metavar="NAME", help="dataset (default: the one the network was trained on)")
    p.add_argument("--root", default=None, metavar="DIR", help="dataset root (default: the training run's)")
    p.add_argument("--negatives", default=None, metavar="DIR", help="negative images for single-category data (default: the training run's)")
    p.add_argument("--split", default="test", metavar="SPLIT", help="split to evaluate (default test)")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a build_dataset option, e.g. num_samples=500 (repeatable)")
    p.add_argument("--layer", default="new", choices=("new", "top"), help="interpretable layer to evaluate (default new: the paper's top conv-layer)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for metrics.json and report.html")
    add_eval_arguments(p)
    return p


def dataset_for(cfg, *, dataset=None, root=None, negatives=None, split="test", options=None):
    """The evaluation dataset of a trained run's config, with overrides."""
    from icnn.data import build_dataset

    from ._common import existing_dir

    name = dataset or cfg.dataset
    root = root if root is not None else (cfg.root if name == cfg.dataset else None)
    negatives = negatives if negatives is not None else cfg.negatives_root
    existing_dir("--root", root)
    existing_dir("--negatives", negatives)
    kwargs = {**(cfg.dataset_kwargs if name == cfg.dataset else {}), **(options or {})}
    return build_dataset(name, root, split=split, task=cfg.task, image_size=cfg.image_size, negatives_root=negatives, **kwargs)


def filter_categories(model, state):
    """Each filter's target category from the filter loss's state (interpretable nets), else None."""
    import torch

    fls = (state or {}).get("filter_losses") or {}
    st = fls.get("new")
    if not getattr(model, "interpretable", False) or st is None or model.num_classes == 1:
        return None
    means = st["class_sum"] / st["class_count"].clamp_min(1)[:, None]
    return torch.where(st["fixed_targets"] >= 0, st["fixed_targets"], means.argmax(0))


def run(args: argparse.Namespace) -> int:
    from icnn import __version__
    from icnn.evaluate import evaluate, json_safe
    from icnn.report.run import write_run_report
    from icnn.training.checkpoint import CheckpointError, atomic_write_json, load_model

    from ._common import parse_device
    from .train import _key_values

    from icnn.training.engine import resolve_device

    device = str(resolve_device(parse_device(args.device)))
    try:
        model, cfg, state = load_model(args.checkpoint, device=device)
    except CheckpointError as exc:
        raise UsageError(f"--checkpoint {args.checkpoint}: {exc}") from None
    options = _key_values("--dataset-option", args.dataset_option, "num_samples=500")
    ds = dataset_for(cfg, dataset=args.dataset, root=args.root, negatives=args.negatives, split=args.split, options=options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(model, ds, eval_config(args, device, args.layer), categories=filter_categories(model, state))
    name = "interpretable" if model.interpretable else "ordinary"
    metrics = {name: result.metrics, "per_filter": result.per_filter, "checkpoint": str(args.checkpoint),
               "train_config": cfg.to_dict(), "icnn_version": __version__}
    atomic_write_json(out / "metrics.json", json_safe(metrics))
    write_run_report(out / "report.html", f"{cfg.arch} ({name})", model, ds, result, config=cfg.to_dict(),
                     meta={"checkpoint": str(args.checkpoint), "dataset": ds.__class__.__name__, "images": len(ds)})
    print(summary_line(name, result.metrics))
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
    return 0


def summary_line(name: str, m: dict) -> str:
    parts = [f"{name}: accuracy {m['accuracy']:.4f}"]
    if "location_instability" in m:
        r = m["instability_references"]
        parts.append(f"location instability {m['location_instability']:.4f} (random unit {r['random_unit']:.4f}, "
                     f"best fixed unit {r['best_fixed_unit']:.4f})")
        parts[-1] += silent_note(m.get("silent_in_top", 0.0), m.get("location_instability_firing"))
    if "part_interpretability" in m:
        parts.append(f"part interpretability {m['part_interpretability']:.4f}")
    return ", ".join(parts)


def silent_note(silent_in_top: float, firing: float | None, *, warn_at: float = 0.05) -> str:
    """`` [..% of the top images silent; firing only ..]`` where silent maps move the figure."""
    if silent_in_top < warn_at or firing is None:
        return ""
    return f" [{silent_in_top:.0%} of its top images silent; firing only {firing:.4f}]"


def dump(obj) -> str:
    return json.dumps(obj, indent=2)
