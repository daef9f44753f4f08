"""``icnn layers --arch NAME``: the layers of a network, their output shapes and receptive fields.

Shapes come from a forward pass on the ``meta`` device (no compute); receptive-field stride,
size and the centre of unit (0, 0) come from ``icnn.metrics.receptive_field``.
"""

from __future__ import annotations

import argparse

from torch import nn

from ._common import add_command


def add_parser(subparsers) -> argparse.ArgumentParser:
    from icnn.models import list_models

    p = add_command(
        subparsers, "layers", run,
        help="list a network's layers with output shapes and receptive fields",
        description="List the layers of a registered network (made interpretable) with their output "
        "shapes and receptive-field geometry. 'layers.new' is the evaluated interpretable layer.",
    )
    p.add_argument("--arch", required=True, choices=list_models(), metavar="NAME", help="one of: " + ", ".join(list_models()))
    p.add_argument("--image-size", type=int, default=None, help="input size in pixels (default: the arch's own)")
    p.add_argument("--num-classes", type=int, default=1, help="logits width (default 1: single-category)")
    return p


def layer_rows(model: nn.Module, image_size: int) -> list[tuple[str, str, str, str]]:
    """``(name, type, output shape, receptive field)`` for each listed layer, in forward order."""
    from icnn.metrics.receptive_field import GeometryError, layer_geometry
    from icnn.models import output_shapes

    names = ["normalize"]
    names += [f"stem.{n}" for n, _ in model.stem.named_children()]
    names += [f"layers.{n}" for n in model.layer_names]
    names += [f"head.{n}" for n, _ in model.head.named_children()]
    shapes = output_shapes(model, image_size, names)
    modules = dict(model.named_modules())
    rows = []
    for name in names:
        try:
            g = layer_geometry(model, name)
            rf = f"stride {g.stride[1]:>3}  size {g.size[1]:>4}  centre(0,0) {g.offset[1] + 0.5:g}"
        except GeometryError:
            rf = "-"
        shape = "x".join(str(s) for s in shapes.get(name, ()))
        rows.append((name, type(modules[name]).__name__, shape, rf))
    return rows


def run(args: argparse.Namespace) -> int:
    from icnn.cli import UsageError
    from icnn.models import build_model

    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size must be positive, got {args.image_size}")
    model = build_model(args.arch, num_classes=args.num_classes, interpretable=True, image_size=args.image_size)  # None: its own
    size = model.image_size[0]
    rows = layer_rows(model, size)
    header = ("layer", "type", "output (C x h x w)", "receptive field (x, pixels)")
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(4)]
    print(f"{args.arch} at {size}x{size} px, {args.num_classes} logits; interpretable layers: "
          f"{', '.join('layers.' + n for n in model.interpretable_layers)}")  # fmt: skip
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0
