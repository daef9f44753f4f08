"""``icnn tree``: mine a trained network's decision modes into a decision tree (Zhang et al.,
CVPR 2019; survey §4.2) and explain its predictions by filters and object parts.

Grows the tree over the positive images of the run's training split, evaluates it at every layer
on the evaluation split (accuracy, prediction error, fitness of the filter contributions, error of
the part contributions against switching a part's filters off) and writes ``OUT/tree/`` (JSON +
safetensors), ``OUT/metrics.json`` and ``OUT/report.html``. Every tree flag is a field of
:class:`icnn.tree.TreeConfig`; the data flags are those of ``icnn evaluate``.
"""

from __future__ import annotations

import argparse
import sys

from . import UsageError
from ._common import add_command
from ._flags import add_config_flags, build, given
from .evaluate import add_data_flags, data_config, load_run

EXPLAINED = 6  # test images explained in the report


def add_parser(subparsers) -> argparse.ArgumentParser:
    from icnn.tree import TreeConfig

    p = add_command(
        subparsers, "tree", run,
        help="mine a trained network's decision modes into a decision tree; explain predictions by filters and parts",
        description="Decision trees over interpretable filters (Zhang et al., CVPR 2019): one leaf per positive training image, "
        "merged bottom-up into decision modes from generic to fine; each prediction is explained by its parse path, "
        "its filter contributions and, from the dataset's landmarks, its part contributions. Writes OUT/tree/, "
        "OUT/metrics.json and OUT/report.html.",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="a run directory of `icnn train` or `icnn compare` (ordinary or interpretable)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for tree/, metrics.json and report.html")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto (cuda when available), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_config_flags(p, TreeConfig, group="tree (icnn.tree.TreeConfig)")
    add_data_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    from icnn import __version__
    from icnn.attribution import ContributionError, assign_filter_parts
    from icnn.evaluate import json_safe
    from icnn.report import write_report
    from icnn.report.tree import tree_sections
    from icnn.training.checkpoint import atomic_write_json, output_dir
    from icnn.training.classify import build_dataset_for, stem_cache_for
    from icnn.training.loop import resolve_device
    from icnn.tree import TreeConfig, evaluate_tree, extract, fit_tree, save_tree

    tcfg = build(TreeConfig, flags=given(args, TreeConfig))
    out = output_dir(args.out)
    device = resolve_device(args.device)
    model, cfg, _ = load_run(args.checkpoint, device)
    if tcfg.layer not in model.layers:
        raise UsageError(f"--layer {tcfg.layer}: not a layer of this network ({', '.join(model.layers)})")
    if model.num_classes != 1:
        raise UsageError(f"--checkpoint {args.checkpoint}: a tree explains a single-category network (this one has {model.num_classes} outputs)")
    cfg = data_config(cfg, args)
    train_set, test_set = build_dataset_for(cfg, "train"), build_dataset_for(cfg, cfg.eval_split or "test")
    if cfg.freeze_stem:  # the stem's outputs once, for extraction and part assignment alike
        cache = stem_cache_for(model, cfg, device)
        train_set, test_set = cache.dataset(train_set, desc="stem cache (train)"), cache.dataset(test_set, desc="stem cache (test)")
    parts = None
    try:
        parts = assign_filter_parts(model, train_set, tcfg.layer)
    except ContributionError as exc:  # no landmarks: the tree and its filter metrics still hold
        print(f"icnn: note: no part contributions ({exc})", file=sys.stderr)
    common = dict(layer=tcfg.layer, site=tcfg.site, parts=parts, device=device, progress=args.progress)
    train_feats = extract(model, train_set, **common)
    if train_feats.g[train_feats.positive].std(0).max() < 1e-9:
        print(f"icnn: note: every image has the same rationale at --site {tcfg.site} (a head linear in the layer's maps): the "
              "tree is one decision mode; --site pre_mask gives per-image rationales through the mask", file=sys.stderr)  # fmt: skip
    test_feats = extract(model, test_set, scale=train_feats.scale, **common)
    tree = fit_tree(train_feats, tcfg, progress=args.progress)
    metrics = evaluate_tree(tree, test_feats, parts=parts)
    save_tree(tree, out / "tree")
    atomic_write_json(out / "metrics.json", json_safe({"layers": metrics, "leaves": tree.num_leaves, "merges": tree.num_merges,
                                                       "config": tcfg.to_dict(), "checkpoint": str(args.checkpoint),
                                                       "icnn_version": __version__}))  # fmt: skip
    figures = _explanations(model, test_set, test_feats, tree, parts, tcfg)
    write_report(out / "report.html", f"icnn tree: {cfg.arch}", tree_sections(tree, metrics, figures), config=tcfg.to_dict(),
                 meta={"checkpoint": str(args.checkpoint), "training images": tree.num_leaves})  # fmt: skip
    second = metrics.get("2", {})
    print(f"tree: {tree.num_leaves} leaves, {tree.num_merges} merges; layer 2: accuracy {second.get('accuracy', float('nan')):.4f} "
          f"(network {metrics['cnn']['accuracy']:.4f})" + (f", part-contribution error {second['part_error']:.4f}" if "part_error" in second else ""))  # fmt: skip
    print(f"wrote {out / 'tree'}, {out / 'metrics.json'} and {out / 'report.html'}")
    return 0


def _explanations(model, dataset, feats, tree, parts, tcfg) -> list[tuple[bytes, str]]:
    """The report's per-image explanations: the first positive test images, at layer 2."""
    import torch

    from icnn.report.tree import explanation_figure
    from icnn.tree import explain

    why = explain(tree=tree, features=feats, layer=2, parts=parts)
    images = getattr(dataset, "base", dataset)
    out = []
    for row in torch.nonzero(feats.positive).flatten()[:EXPLAINED].tolist():
        sample = images[int(feats.index[row])]
        top = why.filters[row].abs().topk(3).indices.tolist()
        with torch.no_grad():
            maps = model.forward_features(sample["image"][None].to(next(model.parameters()).device))
            maps = (maps.relu if tcfg.site == "pre_mask" else maps.masked)[tcfg.layer][0, top].cpu()
        kw = {"part_names": why.part_names, "part_values": why.parts[row].tolist()} if why.parts is not None else {}
        png = explanation_figure(sample["image"], maps, top, why.filters[row, top].tolist(), path=why.path[row].tolist(), **kw)
        out.append((png, f"test image {int(feats.index[row])}: parse path, top filters and their contributions"))
    return out
