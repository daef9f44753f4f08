"""The visualisations of ``icnn visualize``: attribution overlays, the part-contribution figure,
and the "Visualisations" section spliced into an existing report (between
``<!-- icnn:visualisations:begin/end -->`` markers)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .html import ReportError, render_section

SECTION_TITLE = "Visualisations"
SECTION_ID = "visualisations"
BEGIN, END = "<!-- icnn:visualisations:begin -->", "<!-- icnn:visualisations:end -->"


def overlay(image: torch.Tensor, heat: torch.Tensor, *, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) image + alpha cmap(heat)``: image ``(3, H, W)`` in [0, 1], heat ``(h, w)`` in
    [0, 1] (resized to ``(H, W)``, bilinear) -> ``(H, W, 3)`` uint8."""
    import matplotlib

    if heat.shape != image.shape[-2:]:  # bilinear to the image's size
        heat = torch.nn.functional.interpolate(heat[None, None].float(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    colours = matplotlib.colormaps[cmap](heat.clamp(0, 1).cpu().numpy())[..., :3]  # (H, W, 3)
    rgb = (1 - alpha) * image.permute(1, 2, 0).cpu().numpy() + alpha * colours
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def contribution_figure(rgb: np.ndarray, columns: list[str], counts: list[int], shares: list[float], title: str) -> bytes:
    """The overlay next to a horizontal bar per part: ``"head (58 filters)"`` and its share in %."""
    from .figures import _new_figure, _png  # no pyplot: no GUI backend, no global state

    fig = _new_figure(6.4, 2.8)
    ax_img, ax_bar = fig.subplots(1, 2, width_ratios=(1, 1.4))
    ax_img.imshow(rgb)
    ax_img.set_axis_off()
    ax_img.set_title(title, fontsize=9)
    labels = [f"{'other' if i == len(columns) - 1 else c} ({n})" for i, (c, n) in enumerate(zip(columns, counts))]
    pct = [100 * s for s in shares]
    y = np.arange(len(labels))[::-1]
    ax_bar.barh(y, pct, color=["tab:blue" if v >= 0 else "tab:red" for v in pct])
    ax_bar.set_yticks(y, labels, fontsize=8)
    ax_bar.axvline(0, color="k", lw=0.5)
    for yi, v in zip(y, pct):
        ax_bar.annotate(f"{v:.1f}%", (v, yi), fontsize=7, va="center", xytext=(2 if v >= 0 else -2, 0),
                        textcoords="offset points", ha="left" if v >= 0 else "right")  # fmt: skip
    ax_bar.set_xlabel("share of the class score (%)", fontsize=8)
    ax_bar.tick_params(axis="x", labelsize=7)
    lo, hi = min(0.0, *pct), max(0.0, *pct)
    pad = 0.25 * (hi - lo or 1.0)
    ax_bar.set_xlim(lo - (pad if lo < 0 else 0), hi + pad)
    return _png(fig)


def splice_section(page: str, section) -> str | None:
    """``page`` (an icnn report) with the visualisations section in it (replacing an earlier one);
    ``None`` when ``page`` is not an icnn report."""
    block = f"{BEGIN}\n{render_section(SECTION_ID, section)}\n{END}"
    if BEGIN in page and END in page:
        start, stop = page.index(BEGIN), page.index(END) + len(END)
        return page[:start] + block + page[stop:]
    if "</main>" not in page:
        return None
    at = page.find('<section id="config">')
    at = at if at >= 0 else page.rindex("</main>")
    page = page[:at] + block + "\n" + page[at:]
    link = f'<li><a href="#{SECTION_ID}">{SECTION_TITLE}</a></li>'
    if f'href="#{SECTION_ID}"' in page:
        pass
    elif "</ol></nav>" in page:
        page = page.replace("</ol></nav>", f"{link}</ol></nav>", 1)
    elif "<main>" in page:  # a report without sections has no table of contents yet
        page = page.replace("<main>", f'<nav aria-label="Contents"><h2>Contents</h2><ol>{link}</ol></nav>\n<main>', 1)
    return page


def add_to_report(path: Path, section, *, title: str, fallback: Path) -> None:
    from ..training.checkpoint import atomic_write_bytes
    from .html import render_report

    if not path.exists():
        page = render_report(title, [])  # a new report: the section alone, spliced like any other
    else:
        try:
            page = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ReportError(f"--report {path}: cannot read ({exc})") from None
    new = splice_section(page, section)
    if new is None:
        raise ReportError(f"--report {path}: not an icnn HTML report (left unchanged); the section is in {fallback}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, new.encode("utf-8"))
