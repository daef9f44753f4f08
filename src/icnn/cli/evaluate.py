"""``icnn evaluate``: every metric a dataset's annotations allow, for one trained network.

Flags: the evaluation settings (:class:`icnn.evaluate.EvalConfig`) and the data settings of the
run's :class:`icnn.training.TrainConfig` (default: the checkpoint's own).
"""

from __future__ import annotations

import argparse

from . import UsageError
from ._common import add_command
from ._flags import add_config_flags, build, given

DATA_FIELDS = ("dataset", "root", "negatives_root", "dataset_kwargs", "eval_split")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "evaluate", run,
        help="measure a trained network's interpretability and write metrics.json + report.html",
        description="Stream a dataset once through a trained network (a checkpoint of `icnn train`) and compute every "
        "metric its annotations allow: accuracy, location instability with its random-unit and best-fixed-unit "
        "references (landmarks), the collapse figures, part interpretability and Network-Dissection IoU (part "
        "masks). Writes OUT/metrics.json and a self-contained OUT/report.html.",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="a run directory of `icnn train` or its checkpoint/ directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for metrics.json and report.html")
    add_data_flags(p)
    add_eval_flags(p)
    return p


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The data settings of a trained run, overridable (default: the checkpoint's)."""
    from icnn.training import TrainConfig

    add_config_flags(p, TrainConfig, only=DATA_FIELDS, defaults={"eval_split": "test"}, group="data (default: the checkpoint's; split: test)")


def add_eval_flags(p: argparse.ArgumentParser, *, skip=()) -> None:
    from icnn.evaluate import EvalConfig

    add_config_flags(p, EvalConfig, skip=skip, group="evaluation (icnn.evaluate.EvalConfig)")


def eval_config(args: argparse.Namespace, **base):
    from icnn.evaluate import EvalConfig

    return build(EvalConfig, flags=given(args, EvalConfig), base=base)


def load_run(path: str, device: str = "cpu", flag: str = "--checkpoint"):
    """``(model, TrainConfig, state)`` of an ``icnn train`` run; UsageError naming ``flag`` and the path."""
    from icnn.training import CheckpointError, load_model

    try:
        return load_model(path, device=device)
    except CheckpointError as exc:
        raise UsageError(f"{flag} {path}: {exc}") from None


def data_config(cfg, args: argparse.Namespace):
    """The run's TrainConfig with the data flags given here (another dataset drops the run's root and options)."""
    from icnn.training import TrainConfig

    flags = {k: v for k, v in given(args, TrainConfig).items() if k in DATA_FIELDS}
    base = {**cfg.to_dict(), "eval_split": "test"}
    if flags.get("dataset", cfg.dataset) != cfg.dataset:
        base.update(root=None, dataset_kwargs={})
    return build(TrainConfig, flags=flags, base=base)


def run(args: argparse.Namespace) -> int:
    from icnn import __version__
    from icnn.evaluate import evaluate, json_safe
    from icnn.report.run import write_run_report
    from icnn.training.checkpoint import atomic_write_json, output_dir
    from icnn.training.classify import build_dataset_for, filter_categories

    ecfg = eval_config(args)
    out = output_dir(args.out)
    model, cfg, state = load_run(args.checkpoint)
    cfg = data_config(cfg, args)
    if cfg.eval_split is None:
        raise UsageError("--eval-split none: evaluate needs a split (train, fit, val or test)")
    ds = build_dataset_for(cfg, cfg.eval_split)
    result = evaluate(model, ds, ecfg, categories=filter_categories(model, state, ecfg.layer))
    name = "interpretable" if model.interpretable else "ordinary"
    metrics = {name: result.metrics, "per_filter": result.per_filter, "checkpoint": str(args.checkpoint),
               "train_config": cfg.to_dict(), "icnn_version": __version__}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", json_safe(metrics))
    write_run_report(out / "report.html", f"{cfg.arch} ({name})", model, ds, result, config=cfg.to_dict(),
                     meta={"checkpoint": str(args.checkpoint), "dataset": type(ds).__name__, "images": len(ds)})  # fmt: skip
    print(summary_line(name, result.metrics))
    print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
    return 0


def summary_line(name: str, m: dict) -> str:
    from icnn.metrics.instability import references_text

    parts = [f"{name}: accuracy {m['accuracy']:.4f}"]
    if "location_instability" in m:
        parts.append(f"location instability {m['location_instability']:.4f} ({references_text(m['instability_references'])})")
        parts[-1] += silent_note(m.get("silent_in_top", 0.0), m.get("location_instability_firing"))
    col = m.get("collapse")
    if col:
        parts.append(f"peak correlation {col['peak_correlation']:.2f}, share at the commonest unit {col['mode_share']:.2f}, "
                     f"higher on their category {col['higher_on_category']:.2f}")  # fmt: skip
    if "part_interpretability" in m:
        r = m.get("part_interpretability_references") or {}
        refs = f" (random unit {r['random_unit']:.4f}, best fixed unit {r['best_fixed_unit']:.4f})" if r else ""
        parts.append(f"part interpretability {m['part_interpretability']:.4f}{refs}")
    return ", ".join(parts)


def silent_note(silent_in_top: float, firing: float | None, *, warn_at: float = 0.05) -> str:
    """`` [..% of the top images silent; firing only ..]`` where silent maps move the figure."""
    if silent_in_top < warn_at or firing is None:
        return ""
    return f" [{silent_in_top:.0%} of its top images silent; firing only {firing:.4f}]"
