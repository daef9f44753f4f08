"""``icnn explain``: learn an explainer network for a trained, frozen performer (paper 003).

Reads the performer from an ``icnn train`` run (its checkpoint), trains the explainer on the
performer's dataset (or the one named), then evaluates both on ``--eval-split`` and writes
``OUT/metrics.json`` (p, location instability of conv-interp-2 / the performer's top conv-layer /
the layer read, performer error and error with reconstructed features) and ``OUT/report.html``.
``--resume OUT`` continues a stopped run; the performer is never modified.

Under ``torchrun --nproc_per_node=K -m icnn explain ...`` the explainer trains with DDP on K
processes (``--batch-size`` images per process, global batch K times that; one GPU per process,
``cuda:LOCAL_RANK``, or gloo on CPU), as ``icnn train`` does; rank 0 alone writes the run, then
evaluates and writes the metrics and the report, the other processes exit after training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from . import UsageError
from ._common import existing_dir, fresh_out_dir, load_config_file, parse_device
from .evaluate import silent_note

# argparse dest -> ExplainerConfig field
FLAGS = {
    "layer": "layer", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "p_lr": "p_lr", "eta": "eta", "logit_weight": "logit_weight",
    "lambda_f_scale": "lambda_f_scale",
    "optimizer": "optimizer", "seed": "seed", "num_workers": "num_workers", "log_every": "log_every",
    "checkpoint_every": "checkpoint_every", "progress": "progress",
}  # fmt: skip
# ExplainerConfig field -> the flag that sets it (for error messages)
FLAG_OF = {field: "--" + dest.replace("_", "-") for dest, field in FLAGS.items()}
FLAG_OF.update({"objective": "--baseline", "reconstruct": "--reconstruct", "filter_loss": "--filter-loss", "progress": "--no-progress"})


def add_parser(subparsers) -> argparse.ArgumentParser:
    from icnn.explainer import ExplainerConfig

    d = ExplainerConfig()
    S = argparse.SUPPRESS
    p = subparsers.add_parser(
        "explain",
        help="learn an explainer network for a trained CNN (the performer stays untouched)",
        description=(
            "Explainer networks (Zhang et al., 'Unsupervised learning of neural networks to explain neural networks'): "
            "an auto-encoder attached to a frozen performer disentangles its features into part filters "
            "(interpretable track, share p) plus an ordinary track, and reconstructs the performer's fc features. "
            "Writes OUT/checkpoint/, OUT/log.csv, OUT/metrics.json and OUT/report.html. "
            "Many GPUs/processes: torchrun --nproc_per_node=K -m icnn explain ... (--batch-size is per process)."
        ),
    )
    p.set_defaults(func=run)
    p.add_argument("--performer", required=True, metavar="PATH", help="the performer: an `icnn train` output directory or its checkpoint/")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings from a TOML/YAML/JSON file (ExplainerConfig field names; flags given here win), "
                        "e.g. configs/explain_cub200_efficientnet_lite0.toml")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with its saved settings "
                        "(--epochs, --device, workers and logging may change; the rest must match)")
    g = p.add_argument_group("data (default: the performer's)")
    g.add_argument("--dataset", default=None, metavar="NAME", help="dataset from icnn.data")
    g.add_argument("--root", default=None, metavar="DIR", help="dataset root directory")
    g.add_argument("--negatives", default=None, metavar="DIR", help="negative images (single-category)")
    g.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE", help="a build_dataset option (repeatable)")
    g.add_argument("--eval-split", default="test", metavar="SPLIT", help="split evaluated at the end (default test)")
    g = p.add_argument_group("explainer")
    g.add_argument("--layer", default=S, metavar="NAME", help=f"performer map explained: stem (relu4 / relu5_2) or a layer name (default {d.layer})")
    g.add_argument("--reconstruct", default=None, metavar="A,B", help="performer head modules to reconstruct (default fc6,fc7; GAP heads: flatten)")
    g.add_argument("--baseline", choices=("cls",), default=None, help="cls: the explainer+cls baseline (classification loss instead of reconstruction)")
    g.add_argument("--eta", type=float, default=S, metavar="X", help="weight of -log p (default 1e6; 1.5e5 for vgg16)")
    g.add_argument("--logit-weight", type=float, default=S, metavar="X",
                   help="also match the performer's own logits on the reconstruction, this weight relative to lambda_l (label-free; "
                        "keeps what the classifier reads; default 0 = the paper's loss)")
    g.add_argument("--lambda-f-scale", type=float, default=S, metavar="X",
                   help=f"weight of the filter losses: lambda_f = X / epoch * E||dRec/dx_f|| / E||dLoss_f/dx_f|| (default {d.lambda_f_scale:.4g} = 1/300, the Appendix)")
    g.add_argument("--filter-loss", action="append", default=[], metavar="KEY=VALUE", help="a FilterLoss option, e.g. mode=exact (repeatable)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, metavar="N", help=f"default {d.epochs}")
    g.add_argument("--batch-size", type=int, default=S, metavar="N", help=f"images per step and process (default {d.batch_size})")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=S, help=f"default {d.optimizer}")
    g.add_argument("--lr", type=float, default=S, metavar="X", help=f"default {d.lr}")
    g.add_argument("--p-lr", type=float, default=S, metavar="X", help=f"learning rate of w_p (default {d.p_lr})")
    g.add_argument("--seed", type=int, default=S, metavar="N", help=f"default {d.seed}")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--num-workers", type=int, default=S, metavar="N", help="DataLoader workers")
    g.add_argument("--log-every", type=int, default=S, metavar="N", help=f"default {d.log_every}")
    g.add_argument("--checkpoint-every", type=int, default=S, metavar="N", help="also checkpoint every N steps")
    g.add_argument("--top-k", type=int, default=100, metavar="N", help="images per filter and landmark for location instability (paper: 100)")
    g.add_argument("--panels", type=int, default=6, metavar="N", help="filters shown in the report")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    return p


def _key_values(flag: str, items: list[str]) -> dict:
    table = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {item}: expected KEY=VALUE")
        try:
            table[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            table[key.strip().replace("-", "_")] = value
    return table


def load_performer(path: str, device: str):
    """``(performer, TrainConfig)`` from an ``icnn train`` run; UsageError naming the path."""
    import torch

    from icnn.training import CheckpointError, ConfigError, TrainConfig, load_checkpoint
    from icnn.training.engine import build_model_for, resolve_device

    try:
        weights, _, config = load_checkpoint(path)
        tcfg = TrainConfig.from_dict(config, source=f"--performer {path}")
    except (CheckpointError, ConfigError) as exc:
        raise UsageError(f"--performer {path}: {exc}") from None
    head = [k for k in weights if k.startswith("head.") and k.endswith(".weight") and weights[k].dim() == 2]
    if not head:
        raise UsageError(f"--performer {path}: no linear head in the checkpoint's weights")
    num_classes = int(weights[head[-1]].shape[0])  # the head's last linear (state-dict order)
    model = build_model_for(dataclasses.replace(tcfg, weights=None), num_classes)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UsageError(f"--performer {path}: weights do not fit {tcfg.arch} ({str(exc).splitlines()[0]})") from None
    dev = resolve_device(device)
    return model.to(dev).eval().requires_grad_(False), tcfg, dev


def _config_file_values(path: str) -> dict:
    """ExplainerConfig settings from a TOML/YAML/JSON file; UsageError naming the file."""
    from icnn.explainer import ExplainerConfig, ExplainerError

    values = load_config_file(path)
    try:
        ExplainerConfig.from_dict(values)
    except (ExplainerError, TypeError) as exc:
        raise UsageError(f"--config {path}: {exc}") from None
    return values


def _resumed_values(out: Path, given: dict, performer: str, digest: str, file_only: dict) -> dict:
    """The settings of the run in ``out`` with those given now (``resume_conflicts`` decides
    which may change); a conflict is a UsageError naming the flag, or the config file for the
    ``file_only`` settings (``{field: path}``). ``digest``: sha256 of ``performer``'s weights."""
    from icnn.explainer import ExplainerConfig, ExplainerError
    from icnn.explainer.train import resume_conflicts
    from icnn.training.checkpoint import CONFIG_FILE, CheckpointError, resolve_checkpoint

    try:
        ckpt_dir = resolve_checkpoint(out)
        saved = json.loads((ckpt_dir / CONFIG_FILE).read_text())
    except (CheckpointError, OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--resume: {out} holds no explainer run to continue ({exc})") from None
    was = saved.get("performer_weights_sha256")
    if was is not None and was != digest:
        raise UsageError(f"--performer {performer}: not the performer the run in {out} explains "
                         f"({saved.get('performer')}, weights sha256 {was[:12]}...)")  # fmt: skip
    fields = {f.name for f in dataclasses.fields(ExplainerConfig)}
    values = {**{k: v for k, v in saved.items() if k in fields}, **given}
    try:
        conflicts = resume_conflicts(ExplainerConfig.from_dict(values), saved)
    except ExplainerError as exc:
        raise UsageError(str(exc)) from None
    if conflicts:
        key, (was_value, _) = next(iter(conflicts.items()))
        where = f"--config {file_only[key]} ({key})" if key in file_only else FLAG_OF.get(key, key)
        raise UsageError(f"{where}: a resumed run keeps its checkpoint's setting ({key} = {was_value!r}); "
                         "drop it or start a new run")  # fmt: skip
    return values


def _weights_digest(performer: str) -> str:
    """sha256 of the performer's weights file: what a resumed run checks, wherever it was moved."""
    import hashlib

    from icnn.training.checkpoint import WEIGHTS_FILE, resolve_checkpoint

    h = hashlib.sha256()
    with open(resolve_checkpoint(performer) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(args: argparse.Namespace) -> int:
    from icnn.data import build_dataset
    from icnn.explainer import ExplainerConfig, evaluate_explainer, train_explainer, write_explainer_report
    from icnn.training import NonFiniteLossError
    from icnn.training.checkpoint import atomic_write_json

    device = parse_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device != "cpu":
        import torch

        if torch.cuda.is_available():  # torchrun: one GPU per process, as icnn train
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0')))}"
    performer, tcfg, dev = load_performer(args.performer, device)
    file_values = _config_file_values(args.config) if args.config else {}
    flag_values = {f: getattr(args, d) for d, f in FLAGS.items() if hasattr(args, d)}
    if args.reconstruct:
        flag_values["reconstruct"] = [t.strip() for t in args.reconstruct.split(",") if t.strip()]
    if args.baseline == "cls":
        flag_values["objective"] = "cls"
    if args.filter_loss:
        flag_values["filter_loss"] = {**file_values.get("filter_loss", {}), **_key_values("--filter-loss", args.filter_loss)}
    values = {**file_values, **flag_values, "device": str(dev), "out": args.out}
    out = Path(args.out)
    digest = _weights_digest(args.performer)
    if args.resume:
        file_only = {k: args.config for k in file_values.keys() - flag_values.keys()}
        values = _resumed_values(out, values, args.performer, digest, file_only)
    else:
        fresh_out_dir(out, hint="; continue it with --resume or choose another --out")
    cfg = ExplainerConfig.from_dict(values)

    dataset = args.dataset or tcfg.dataset
    root = existing_dir("--root", args.root if args.root is not None else (tcfg.root if dataset == tcfg.dataset else None))
    negatives = existing_dir("--negatives", args.negatives or (tcfg.negatives_root if dataset == tcfg.dataset else None))
    kw = dict(tcfg.dataset_kwargs) if dataset == tcfg.dataset else {}
    kw.update(_key_values("--dataset-option", args.dataset_option))
    common = dict(task=tcfg.task, image_size=tcfg.image_size, negatives_root=negatives, **kw)
    train_set = build_dataset(dataset, root, split="train", **common)
    eval_set = build_dataset(dataset, root, split=args.eval_split, **common)

    try:
        result = train_explainer(performer, train_set, cfg, resume=out if args.resume else None,
                                 extra_config={"performer": str(args.performer), "dataset": dataset,
                                               "performer_weights_sha256": digest})  # fmt: skip
    except NonFiniteLossError as exc:
        print(f"icnn: error: {exc}", file=sys.stderr)
        return 1
    if result.rank != 0:  # torchrun: rank 0 evaluates and writes, the others are done
        return 0
    ev = evaluate_explainer(performer, result.explainer, eval_set, layer=cfg.layer, batch_size=cfg.batch_size,
                            top_k=args.top_k, seed=cfg.seed, num_workers=cfg.num_workers)  # fmt: skip
    metrics = {**ev.metrics, "objective": cfg.objective, "eval_split": args.eval_split, "performer": str(args.performer),
               "epochs": cfg.epochs, "train_history": result.history[-1:] }  # fmt: skip
    atomic_write_json(out / "metrics.json", metrics)
    write_explainer_report(out / "report.html", performer, result.explainer, eval_set, ev, layer=cfg.layer,
                           panels=args.panels, config=cfg.to_dict())  # fmt: skip
    m = ev.metrics
    line = f"p {m['p']:.3f}  error: performer {m['performer_error']:.4f}, explainer {m['explainer_error']:.4f}"
    if "instability_ratio" in m:
        line += (f"  instability: explainer {m['explainer/location_instability']:.4f}, performer top "
                 f"{m['performer_top/location_instability']:.4f} (ratio {m['instability_ratio']:.3f})")  # fmt: skip
        line += silent_note(m["explainer/silent_in_top"], m["explainer/location_instability_firing"])
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
