"""``icnn explain``: learn an explainer network for a trained, frozen performer (paper 003).

Reads the performer from an ``icnn train`` run (its checkpoint), trains the explainer on the
performer's dataset (or the one named), evaluates both on ``--eval-split`` and writes
``OUT/metrics.json`` (p, per view the metrics of ``icnn evaluate``: conv-interp-2, the performer's
top conv-layer, the layer read; the performer's error and the error with reconstructed features)
and ``OUT/report.html``. Every explainer flag is a field of :class:`icnn.explainer.ExplainerConfig`.
``--resume RUN`` continues a stopped run with its saved settings; the performer is never modified.
When the performer's stem is frozen and the explainer reads it, its outputs are computed once.

Under ``torchrun --nproc_per_node=K -m icnn explain ...`` the explainer trains with DDP on K
processes, as ``icnn train`` does; rank 0 alone writes the run, then evaluates and writes the
metrics and the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ._common import add_command, add_common_flags
from ._flags import add_config_flags, build_run, given
from .evaluate import add_data_flags, add_eval_flags, data_config, eval_config, load_run, silent_note


def add_parser(subparsers) -> argparse.ArgumentParser:
    from icnn.explainer import ExplainerConfig

    p = add_command(
        subparsers, "explain", run,
        help="learn an explainer network for a trained CNN (the performer stays untouched)",
        description="Explainer networks (Zhang et al., 'Unsupervised learning of neural networks to explain neural networks'): "
        "an auto-encoder attached to a frozen performer disentangles its features into part filters "
        "(interpretable track, share p) plus an ordinary track, and reconstructs the performer's fc features. "
        "Writes OUT/checkpoint/, OUT/log.csv, OUT/metrics.json and OUT/report.html. "
        "Many GPUs/processes: torchrun --nproc_per_node=K -m icnn explain ... (--batch-size is per process).",
    )
    p.add_argument("--performer", required=True, metavar="RUN", help="the performer: an `icnn train` output directory or its checkpoint/")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the explainer run in RUN with its saved settings "
                   "(--epochs, --device, workers and logging may change)")
    add_config_flags(p, ExplainerConfig, group="explainer (icnn.explainer.ExplainerConfig)")
    add_common_flags(p)
    add_data_flags(p)
    add_eval_flags(p, skip=("layer", "batch_size", "num_workers", "device", "seed", "progress"))
    return p


def load_performer(path: str, device: str):
    """``(performer, TrainConfig)`` from an ``icnn train`` run, frozen; UsageError naming the path."""
    from icnn.training.loop import resolve_device

    model, cfg, _ = load_run(path, resolve_device(device), flag="--performer")
    return model.requires_grad_(False), cfg


def _weights_digest(performer: str) -> str:
    """sha256 of the performer's weights file: what a resumed run checks, wherever it was moved."""
    import hashlib

    from icnn.training.checkpoint import WEIGHTS_FILE, resolve_checkpoint

    with open(resolve_checkpoint(performer) / WEIGHTS_FILE, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_config(args: argparse.Namespace):
    """The run's config and the run to resume (or None); a resumed run keeps its settings."""
    from icnn.explainer import ExplainerConfig

    return build_run(ExplainerConfig, args, given(args, ExplainerConfig))


def run(args: argparse.Namespace) -> int:
    from icnn.evaluate import json_safe
    from icnn.explainer import evaluate_explainer, train_explainer
    from icnn.report.explainer import write_explainer_report
    from icnn.training.checkpoint import atomic_write_json
    from icnn.training.classify import build_dataset_for, stem_cache_for

    cfg, resume = build_config(args)
    device = cfg.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device != "cpu":
        import torch

        if torch.cuda.is_available():  # torchrun: one GPU per process, as icnn train
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0')))}"
            cfg = dataclasses.replace(cfg, device=device)
    ecfg = eval_config(args, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed, device=str(device),
                       progress=cfg.progress)  # fmt: skip
    performer, tcfg = load_performer(args.performer, device)
    dcfg = data_config(tcfg, args)
    train_set = build_dataset_for(dcfg, cfg.train_split)
    eval_set = build_dataset_for(dcfg, dcfg.eval_split or "test")
    if tcfg.freeze_stem and cfg.layer == "stem":
        run_on = str(next(performer.parameters()).device)
        cache = stem_cache_for(performer, dataclasses.replace(dcfg, device=run_on, cache_dir=ecfg.cache_dir, progress=cfg.progress))
        train_set, eval_set = cache.dataset(train_set, desc="stem cache (train)"), cache.dataset(eval_set, desc="stem cache (eval)")
    result = train_explainer(performer, train_set, cfg, resume=resume,
                             extra_config={"performer": str(args.performer), "dataset": dcfg.dataset,
                                           "performer_weights_sha256": _weights_digest(args.performer)})  # fmt: skip
    if result.rank != 0:  # torchrun: rank 0 evaluates and writes, the others are done
        return 0
    explainer = result.objective.model
    ev = evaluate_explainer(performer, explainer, eval_set, layer=cfg.layer, config=ecfg)
    out = Path(cfg.out)
    metrics = {**ev.metrics, "objective": cfg.objective, "eval_split": dcfg.eval_split, "performer": str(args.performer),
               "epochs": cfg.epochs, "train_history": result.history[-1:]}  # fmt: skip
    atomic_write_json(out / "metrics.json", json_safe(metrics))
    write_explainer_report(out / "report.html", performer, explainer, eval_set, ev, layer=cfg.layer, panels=ecfg.panels,
                           config=cfg.to_dict())  # fmt: skip
    m = ev.metrics
    line = f"p {m['p']:.3f}  error: performer {m['performer_error']:.4f}, explainer {m['explainer_error']:.4f}"
    if "instability_ratio" in m:
        e, t = m["explainer"], m["performer_top"]
        line += (f"  instability: explainer {e['location_instability']:.4f}, performer top {t['location_instability']:.4f} "
                 f"(ratio {m['instability_ratio']:.3f})")  # fmt: skip
        line += silent_note(e["silent_in_top"], e["location_instability_firing"])
    print(line)
    hint = weak_filter_loss_hint(m, cfg.lambda_f_scale)
    if hint:
        print(hint, file=sys.stderr)
    print(f"metrics: {out / 'metrics.json'}\nreport: {out / 'report.html'}")
    return 0


def weak_filter_loss_hint(m: dict, scale: float, *, at: float = 0.9) -> str:
    """A note when conv-interp-2 is hardly more stable than the performer's top layer: the
    Appendix's lambda_f was far too weak on real features (docs/explainer.md)."""
    ratio = m.get("instability_ratio")
    if ratio is None or not ratio >= at:
        return ""
    return (f"icnn: note: the explainer's filters are hardly more stable than the performer's (ratio {ratio:.2f} at "
            f"--lambda-f-scale {scale:.4g}); on real birds the Appendix's weight was far too weak and "
            "--lambda-f-scale 8 gave 0.58x (configs/explain_cub200_efficientnet_lite0.toml, "
            "docs/explainer.md 'Real birds')")
