"""A self-contained HTML report: sections of tables and figures, one file, no network.

Everything the page needs is inside it: the CSS is inlined, figures are PNGs embedded as
``data:`` URIs, and there is no JavaScript. Every piece of text is escaped (``html.escape``), so
run names, part names or captions can hold any characters.

    sections = [Section("Metrics", tables=[Table(["metric", "value"], [["instability", 0.0741]])]),
                Section("Filters", figures=[Figure(png_bytes, "filter 3 (paper Fig. 4)")])]
    write_report("runs/x/report.html", "icnn run x", sections, config=cfg)
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

MISSING = "–"  # shown for NaN / None / absent values (en dash)


class ReportError(ValueError):
    """Bad input to the report; the message is one line naming the argument."""


@dataclass
class Table:
    """A table; cells are formatted by :func:`format_value` (numbers right-aligned)."""

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ReportError(
                    f"Table {self.caption or self.columns!r}: row {i} has {len(row)} cells, "
                    f"expected {len(self.columns)} (one per column)"
                )


@dataclass
class Figure:
    """A PNG figure with its caption; ``wide`` figures take a whole row of the grid."""

    png: bytes
    caption: str
    wide: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.png, (bytes, bytearray)) or not bytes(self.png[:8]) == b"\x89PNG\r\n\x1a\n":
            raise ReportError(f"Figure {self.caption!r}: png must be the bytes of a PNG image")


@dataclass
class Section:
    """One titled section of the report: optional text, then its tables, then its figures."""

    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    text: str = ""


def _scalar(value: Any) -> Any:
    """numpy / torch 0-d values as Python numbers; anything else unchanged."""
    if hasattr(value, "item") and tuple(getattr(value, "shape", (None,))) == ():
        return value.item()
    return value


def _is_number(value: Any) -> bool:
    value = _scalar(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def format_value(value: Any) -> str:
    """A table cell as text: 4 significant digits for floats, NaN / None as ``–``."""
    value = _scalar(value)
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return MISSING
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v == 0:
            return "0"
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        if abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(value)


def _lookup(metrics: Mapping[str, Any], key: str, absent: Any = float("nan")) -> Any:
    """``metrics[key]``, or a dotted path into nested dicts (``"instability.layer"``); ``absent`` if absent."""
    if key in metrics:
        return metrics[key]
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return absent
        node = node[part]
    return node


def comparison_section(
    runs: Mapping[str, Mapping[str, Any]],
    keys: Sequence[str],
    *,
    title: str = "Comparison",
    caption: str = "",
    text: str = "",
) -> Section:
    """A section with the side-by-side table of several runs' metrics.

    ``runs`` maps a run name to its metrics (e.g. ``{"ordinary": m0, "interpretable": m1}``);
    ``keys`` are the metrics to show (a key may be a dotted path into nested dicts). With exactly
    two runs a last column gives the ratio second / first (e.g. interpretable / ordinary).
    """
    if not runs:
        raise ReportError("comparison_section: runs is empty; give at least one run's metrics")
    names = list(runs)
    columns = ["metric", *names]
    two = len(names) == 2
    if two:
        columns.append(f"{names[1]} / {names[0]}")
    rows = []
    for key in keys:
        values = [_lookup(runs[name], key) for name in names]
        row = [key, *values]
        if two:
            a, b = values
            ratio = float("nan")
            if _is_number(a) and _is_number(b) and float(_scalar(a)) != 0:
                ratio = float(_scalar(b)) / float(_scalar(a))
            row.append(ratio)
        rows.append(row)
    return Section(title, tables=[Table(columns, rows, caption)], text=text)


# ---------------------------------------------------------------- rendering

_e = html.escape


def _slug(index: int, title: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]
    return f"s{index}-{words}" if words else f"s{index}"


def _render_text(text: str) -> str:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "".join(f"<p>{_e(p)}</p>\n" for p in paragraphs)


def _render_table(table: Table) -> str:
    out = ['<div class="table-wrap"><table>']
    if table.caption:
        out.append(f"<caption>{_e(table.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_e(str(c))}</th>" for c in table.columns) + "</tr></thead>")
    out.append("<tbody>")
    for row in table.rows:
        cells = []
        for value in row:
            cls = ' class="num"' if _is_number(value) or value is None else ""
            cells.append(f"<td{cls}>{_e(format_value(value))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _render_figure(fig: Figure) -> str:
    data = base64.b64encode(bytes(fig.png)).decode("ascii")
    cls = ' class="wide"' if fig.wide else ""
    return (
        f'<figure{cls}><img src="data:image/png;base64,{data}" alt="{_e(fig.caption)}">'
        f"<figcaption>{_e(fig.caption)}</figcaption></figure>"
    )


def render_section(sid: str, s: Section) -> str:
    """One ``<section id="sid">``: its title, text, tables and figures."""
    parts = [f'<section id="{sid}"><h2>{_e(s.title)}</h2>', _render_text(s.text), *(_render_table(t) for t in s.tables)]
    if s.figures:
        parts.append('<div class="grid">' + "".join(_render_figure(f) for f in s.figures) + "</div>")
    return "\n".join([*parts, "</section>"])


def _css() -> str:
    return resources.files(__package__).joinpath("report.css").read_text(encoding="utf-8")


def render_report(
    title: str,
    sections: Sequence[Section],
    *,
    config: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> str:
    """The report as one HTML5 document (a string).

    Args:
        title: page title and heading.
        sections: the sections, in order; a table of contents links to each.
        config: the run's configuration, shown as JSON in a collapsible block.
        meta: short facts shown under the title (e.g. ``{"run": "runs/x", "dataset": "cub"}``).
    """
    for i, s in enumerate(sections):
        if not isinstance(s, Section):
            raise ReportError(f"render_report: sections[{i}] is a {type(s).__name__}, expected Section")
    ids = [_slug(i + 1, s.title) for i, s in enumerate(sections)]
    body = [f"<header><h1>{_e(title)}</h1>"]
    if meta:
        facts = " · ".join(
            f'<span><span class="k">{_e(str(k))}</span> {_e(format_value(v))}</span>' for k, v in meta.items()
        )
        body.append(f'<p class="meta">{facts}</p>')
    body.append("</header>")
    if sections:
        toc = "".join(f'<li><a href="#{i}">{_e(s.title)}</a></li>' for i, s in zip(ids, sections))
        body.append(f'<nav aria-label="Contents"><h2>Contents</h2><ol>{toc}</ol></nav>')
    body.append("<main>")
    body.extend(render_section(sid, s) for sid, s in zip(ids, sections))
    if config is not None:
        text = json.dumps(config, indent=2, default=str, ensure_ascii=False)
        body.append(
            '<section id="config"><details><summary>Configuration (JSON)</summary>'
            f"<pre>{_e(text)}</pre></details></section>"
        )
    body.append("</main>")
    from icnn import __version__

    body.append(f"<footer>icnn {_e(__version__)} · self-contained report (no external resources)</footer>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'  # stops the browser asking the server for /favicon.ico
        f"<title>{_e(title)}</title>\n<style>\n{_css()}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(path: str | os.PathLike, title: str, sections: Sequence[Section], **kwargs: Any) -> Path:
    """Renders the report and writes it atomically (``training.checkpoint.atomic_write_bytes``:
    temp file in the same folder + ``os.replace``).

    A reader never sees a half-written file, and a failed write leaves no temp file behind.
    ``kwargs`` go to :func:`render_report` (``config``, ``meta``). Returns the path written.
    """
    from ..training.checkpoint import atomic_write_bytes

    path = Path(path)
    text = render_report(title, sections, **kwargs)  # render first: a rendering error writes nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
