"""``icnn visualize``: attribution overlays of a trained network on your images, as PNG files and
as a "Visualisations" section of an HTML report.

    icnn visualize --checkpoint runs/x --images photos/ --method gradcam saliency --out runs/x/vis \\
        --report runs/x/report.html

Per image and method it writes ``OUT/<image stem>.<method>.png``:

- ``saliency``, ``guided``, ``deconvnet``, ``gradcam``: the heat map (per-image min-max scaled;
  for the ``(3, H, W)`` outputs of guided backprop and deconvnet the largest absolute value over
  the colour channels) in a colour map over the image, ``(1 - alpha) image + alpha colour``.
- ``actmax``: the image maximising one filter of ``--layer`` (``--target``; default the filter
  most active on that image), from seeded noise (:mod:`icnn.attribution.actmax`).
- ``contributions``: the image with its gradient x activation map of ``--layer``, next to each
  part's share of the class score (:mod:`icnn.attribution.contributions`). Filters are assigned
  to parts on a dataset with landmarks: by default the checkpoint's own (its ``config.json``:
  dataset, root, evaluation split), or ``--dataset/--root/--split``.

The report: ``OUT/visualizations.html`` (self-contained) always holds the section. With
``--report FILE``: an existing icnn report gets the section spliced in (before its configuration
block, with a link in its table of contents); running again replaces that section, nothing else
in the file changes. A ``FILE`` that does not exist is created with the section alone; a file
that is not an icnn report is left untouched (error, exit 2).

Images are read with PIL (any format it knows; a folder means every image file in it, sorted),
converted to RGB, resized (bilinear) to the network's input size, scaled to ``[0, 1]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from icnn.report.html import Figure
from icnn.report.visualize import SECTION_TITLE, add_to_report, contribution_figure, overlay, png_bytes

from . import UsageError
from ._common import add_command
from .evaluate import load_run

METHODS = ("saliency", "guided", "deconvnet", "gradcam", "actmax", "contributions")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DISPLAY_MIN, DISPLAY_MAX = 256, 512  # longer side of the written overlays, in pixels


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "visualize", run,
        help="attribution overlays (saliency, Grad-CAM, ...) of a checkpoint on images, as PNG + HTML",
        description="Write attribution overlays of a trained network on images as PNG files "
        "(OUT/<image>.<method>.png) and an HTML section (OUT/visualizations.html; --report adds it "
        "to a run's report).",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a run's output folder or its checkpoint/ folder (model.safetensors, state.pt, config.json)")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH", help="image files and/or folders of images")
    p.add_argument("--method", nargs="+", default=["gradcam"], metavar="NAME", help=f"one or more of: {', '.join(METHODS)} (default gradcam)")
    p.add_argument("--layer", default="new", help="layer for gradcam/actmax/contributions: 'new', 'top' or a dotted module name (default new)")
    p.add_argument("--target", type=int, default=None, help="class index to explain (default: the predicted class); for actmax, the filter index")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNG files and visualizations.html")
    p.add_argument("--report", default=None, metavar="FILE", help="also add the section to this HTML report (created if absent)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the heat map over the image, in [0, 1] (default 0.5)")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map of the heat map (default jet)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--steps", type=int, default=128, help="gradient-ascent steps of actmax (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of actmax's starting noise (default 0)")
    p.add_argument("--dataset", default=None, help="contributions: dataset with landmarks for assigning filters to parts (default: the checkpoint's)")
    p.add_argument("--root", default=None, help="contributions: that dataset's root folder (default: the checkpoint's)")
    p.add_argument("--split", default=None, help="contributions: that dataset's split (default: the checkpoint's eval split, else test)")
    p.add_argument("--max-images", type=int, default=500, help="contributions: use at most this many images of that dataset (default 500)")
    p.add_argument("--top-n", type=int, default=None, help="contributions: only each filter's top-N images vote for its part (default: all)")
    return p


# ----------------------------------------------------------------------------------------------
# checkpoint and images


def image_paths(paths: list[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"--images {p}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"--images {p}: no such file or directory")
    return out


def display_size(h: int, w: int, lo: int = DISPLAY_MIN, hi: int = DISPLAY_MAX) -> tuple[int, int]:
    """The original ``(h, w)``, scaled so that its longer side lies in ``[lo, hi]``."""
    side = max(h, w)
    s = lo / side if side < lo else hi / side if side > hi else 1.0
    return max(1, round(h * s)), max(1, round(w * s))


def load_images(paths: list[Path], size: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(N, 3, H, W)`` float in ``[0, 1]``, each resized (bilinear) to ``size = (H, W)``, and each
    image at its own aspect ratio for display, ``(3, h, w)`` (:func:`display_size`)."""
    from PIL import Image, UnidentifiedImageError

    def tensor(im) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)

    images, shown = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                images.append(tensor(im.resize((size[1], size[0]), Image.BILINEAR)))
                h, w = display_size(im.height, im.width)
                shown.append(tensor(im.resize((w, h), Image.BILINEAR)))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            why = "not an image PIL can read" if isinstance(exc, UnidentifiedImageError) else str(exc).splitlines()[0]
            raise UsageError(f"--images {p}: cannot read image ({why})") from None
    return torch.stack(images), shown


# ----------------------------------------------------------------------------------------------
# methods


def layer_module(model: nn.Module, layer: str) -> nn.Module:
    """The module whose output is ``layer``'s map: for ``"new"``/``"top"`` the mask (its masked
    map, what the metrics read) or, for the ordinary twin, the conv body; else a dotted name."""
    from icnn.attribution import resolve_layer

    if layer in getattr(model, "layer_names", ()):
        block = model.layers[layer]
        return block.mask if block.mask is not None else block.body
    return resolve_layer(model, layer)


def _heat(attr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Any ``(B, h, w)`` or ``(B, C, H, W)`` attribution -> ``(B, H, W)`` in [0, 1]."""
    from icnn.attribution import minmax_normalize

    if attr.ndim == 4:
        attr = attr.abs().amax(dim=1)
    if attr.shape[-2:] != size:
        attr = torch.nn.functional.interpolate(attr[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax_normalize(attr)


def _most_active(model: nn.Module, module: nn.Module, images: torch.Tensor) -> list[int]:
    """Per image, the channel of ``module``'s output with the largest mean activation."""
    from icnn.attribution import AttributionError

    out = []
    handle = module.register_forward_hook(lambda m, i, o: out.append(o))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    if not out or not torch.is_tensor(out[-1]) or out[-1].ndim != 4:
        raise AttributionError("--layer: must output one (B, C, h, w) map for actmax")
    return out[-1].mean(dim=(2, 3)).argmax(1).tolist()


def attribution_outputs(model, method: str, images: torch.Tensor, shown: list[torch.Tensor], names: list[str], args) -> list:
    """``(file name, Figure)`` of every image: its heat map over the image."""
    from icnn.attribution import GradCAM, GuidedBackprop, Deconvnet, Saliency

    size = tuple(images.shape[-2:])
    target = args.target
    if method == "gradcam":
        with GradCAM(model, layer_module(model, args.layer)) as m:
            attr = m(images, target=target, upsample=True)
    else:
        cls = {"saliency": Saliency, "guided": GuidedBackprop, "deconvnet": Deconvnet}[method]
        with cls(model) as m:
            attr = m(images, target=target)
    heat = _heat(attr, size)
    with torch.no_grad():
        logits = model(images)
    classes = logits.argmax(1).tolist() if target is None else [target] * len(images)
    what = f"layer {args.layer}, " if method == "gradcam" else ""
    return [
        (f"{n}.{method}.png",
         Figure(png_bytes(overlay(img, h, cmap=args.cmap, alpha=args.alpha)), f"{n}: {method} ({what}class {c})"))
        for n, img, h, c in zip(names, shown, heat, classes)
    ]


def actmax_outputs(model, images: torch.Tensor, names: list[str], args) -> list:
    from PIL import Image

    from icnn.attribution import ActivationMaximization, ActMaxConfig

    module = layer_module(model, args.layer)
    channels = [args.target] * len(images) if args.target is not None else _most_active(model, module, images)
    cfg = ActMaxConfig(image_size=tuple(images.shape[-2:]), steps=args.steps)
    with ActivationMaximization(model, module, config=cfg) as act:
        result = act(channels, seed=args.seed)
    out = []
    for n, ch, img in zip(names, channels, result.image):
        rgb = (img.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        h, w = display_size(*rgb.shape[:2])
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.NEAREST))  # pixels stay visible
        out.append((f"{n}.actmax.png", Figure(png_bytes(rgb), f"{n}: actmax of filter {ch} of layer {args.layer}")))
    return out


def _parts_dataset(cfg, args):
    """The images the filters are assigned to parts on: the run's evaluation data (its
    TrainConfig ``cfg``), or ``--dataset/--root/--split`` (another dataset: not the run's options
    and negatives)."""
    from torch.utils.data import Subset

    from icnn.training.classify import build_dataset_for

    name = args.dataset or cfg.dataset
    other = {} if name == cfg.dataset else {"dataset_kwargs": {}, "negatives_root": None}
    root = args.root if args.dataset or args.root else cfg.root
    data = dataclasses.replace(cfg, dataset=name, root=root, **other)
    split = args.split or cfg.eval_split or "test"
    ds = build_dataset_for(data, split)
    return ds if len(ds) <= args.max_images else Subset(ds, range(args.max_images)), f"{name} {split}"


def contribution_outputs(model, cfg, images: torch.Tensor, shown: list[torch.Tensor], names: list[str], args):
    """Per-image figures, plus the section's text and table."""
    from icnn.attribution.contributions import (
        assign_filter_parts,
        dataset_part_contributions,
        filter_contributions,
        part_contributions,
    )
    from icnn.report import Table

    ds, label = _parts_dataset(cfg, args)
    parts = assign_filter_parts(model, ds, args.layer, top_n=args.top_n)
    overall = dataset_part_contributions(model, ds, parts, target=args.target)
    pc = part_contributions(model, images, parts, target=args.target)
    size = tuple(images.shape[-2:])
    _, spatial, _, _ = filter_contributions(model, images, layer=args.layer, target=args.target)
    heat = _heat(spatial.clamp_min(0), size)
    counts = parts.counts().tolist()
    outs = []
    for i, n in enumerate(names):
        rgb = overlay(shown[i], heat[i], cmap=args.cmap, alpha=args.alpha)
        title = f"{n}: class {int(pc.target[i])}, score {pc.score[i].item():.3g}"
        png = contribution_figure(rgb, pc.columns, counts, pc.share[i].tolist(), title)
        outs.append((f"{n}.contributions.png", Figure(png, f"{n}: part contributions (layer {args.layer})")))
    text = (
        f"Part contributions (layer {args.layer}): each filter is assigned to the landmark nearest to its "
        f"argmax unit most often, on {len(overall.share)} annotated images of {label}; the score of the "
        f"class is split by gradient x activation, shares relative to the sum of |contributions| "
        f"(icnn.attribution.contributions). Over those images: " + "; ".join(overall.summary()) + "."
    )
    columns = ["image", "class", "score", *[f"{'other' if c == 'none' else c} (%)" for c in pc.columns]]
    rows = [
        [n, int(pc.target[i]), pc.score[i].item(), *[100 * s for s in pc.share[i].tolist()]] for i, n in enumerate(names)
    ]
    return outs, text, Table(columns, rows, caption="share of each part in the class score, per image")


# ----------------------------------------------------------------------------------------------


def _file_names(paths: list[Path]) -> list[str]:
    """Image stems, made unique (``cat``, ``cat-2``) and safe as file names."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem) or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def run(args: argparse.Namespace) -> int:
    from icnn.report import Section, write_report
    from icnn.training.checkpoint import output_dir
    from icnn.training.loop import resolve_device

    methods = list(dict.fromkeys(args.method))
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"--method {m}: unknown method; choose from {', '.join(METHODS)}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise UsageError(f"--cmap {args.cmap}: not a matplotlib colour map")
    if args.steps < 1:
        raise UsageError(f"--steps must be positive, got {args.steps}")
    device = resolve_device(args.device)
    paths = image_paths(args.images)
    model, cfg, _ = load_run(args.checkpoint, device)
    try:
        layer_module(model, args.layer)
    except ValueError as exc:
        raise UsageError(f"--layer {args.layer}: {str(exc).removeprefix('layer: ')}") from None
    if "contributions" in methods:
        if args.layer not in model.layer_names:
            raise UsageError(f"--layer {args.layer}: contributions need one of the network's layers {', '.join(model.layer_names)}")
        if args.top_n is not None and args.top_n < 1:
            raise UsageError(f"--top-n must be positive, got {args.top_n}")
        if args.max_images < 1:
            raise UsageError(f"--max-images must be positive, got {args.max_images}")
    images, shown = load_images(paths, model.image_size)
    images = images.to(device)
    names = _file_names(paths)
    out = output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)

    outputs: list[tuple[str, Figure]] = []  # (file name, figure)
    tables, texts = [], []
    for method in methods:
        if method == "actmax":
            outputs += actmax_outputs(model, images, names, args)
        elif method == "contributions":
            figs, text, table = contribution_outputs(model, cfg, images, shown, names, args)
            outputs += figs
            texts.append(text)
            tables.append(table)
        else:
            outputs += attribution_outputs(model, method, images, shown, names, args)
    for name, fig in outputs:
        (out / name).write_bytes(fig.png)

    texts.insert(0, f"{len(paths)} image(s), {cfg.arch} from {args.checkpoint}; methods: {', '.join(methods)}; "
                    f"layer {args.layer}; target {'predicted class' if args.target is None else args.target}.")  # fmt: skip
    section = Section(SECTION_TITLE, tables=tables, figures=[fig for _, fig in outputs], text="\n\n".join(texts))
    title = f"icnn visualisations: {cfg.arch}"
    page = write_report(out / "visualizations.html", title, [section], meta={"checkpoint": str(args.checkpoint)})
    if args.report is not None:
        add_to_report(Path(args.report), section, title=title, fallback=page)
    print(f"wrote {len(outputs)} PNG file(s) to {out} and {page}" + (f"; section added to {args.report}" if args.report else ""))
    return 0
