"""The HTML report: tables, embedded figures, escaping, self-containment, atomic writes."""

import base64
import io
import math
import os
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from icnn.report import (
    Figure,
    ReportError,
    Section,
    Table,
    comparison_section,
    format_value,
    render_report,
    write_report,
)

VOID = {"meta", "link", "img", "br", "hr", "input", "col", "wbr", "source"}


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), colour).save(buf, format="PNG")
    return buf.getvalue()


class _Checker(HTMLParser):
    """Tag balance (non-void tags closed in order), ids, links and every src/href."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.ids, self.refs, self.tags = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        self.refs += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")


def _check(doc: str) -> _Checker:
    c = _Checker()
    c.feed(doc)
    c.close()
    assert not c.errors and not c.stack, (c.errors, c.stack)
    return c


def _sections():
    t = Table(["part", "filters", "P_f"], [["head", 31, 0.41234], ["tail <&>", 2, float("nan")]], "Parts & filters")
    return [
        Section("Metrics", tables=[t], text="First paragraph.\n\nSecond <b>not bold</b>."),
        Section("Figures", figures=[Figure(_png("red"), 'filter "3" <x>'), Figure(_png("blue"), "wide", wide=True)]),
    ]


@pytest.mark.parametrize(
    "value, text",
    [
        (0.074123, "0.07412"), (0.5, "0.5"), (2.0, "2"), (123456.7, "123,457"), (1e-5, "1e-05"),
        (float("nan"), "–"), (None, "–"), (float("inf"), "∞"), (3, "3"), (True, "yes"), (0, "0"),
        (np.float32(0.25), "0.25"), (np.int64(7), "7"), (torch.tensor(1.5), "1.5"), ("vgg16", "vgg16"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_render_report_tables_figures_and_toc():
    config = {"arch": "vgg16", "note": "</pre><script>"}
    doc = render_report("Run <1>", _sections(), config=config, meta={"dataset": "cub"})
    c = _check(doc)
    assert doc.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in doc
    # the table, numbers formatted and right-aligned, NaN as a dash
    assert "<caption>Parts &amp; filters</caption>" in doc
    assert '<td class="num">0.4123</td>' in doc and '<td class="num">–</td>' in doc
    assert "<td>tail &lt;&amp;&gt;</td>" in doc
    # each figure is its own PNG as a data URI
    for colour in ("red", "blue"):
        assert f"data:image/png;base64,{base64.b64encode(_png(colour)).decode()}" in doc
    assert '<figure class="wide">' in doc
    # table of contents links to every section; config is collapsible, escaped JSON
    assert [r for r in c.refs if r.startswith("#")] == [f"#{i}" for i in c.ids if i != "config"]
    assert "<details><summary>Configuration (JSON)</summary>" in doc
    assert "&quot;arch&quot;: &quot;vgg16&quot;" in doc and "&lt;/pre&gt;&lt;script&gt;" in doc
    assert "<p>First paragraph.</p>" in doc and "Second &lt;b&gt;not bold&lt;/b&gt;." in doc


def test_render_report_is_self_contained_and_escaped():
    doc = render_report("<script>alert(1)</script>", _sections(), config={"url": "see http://x"})
    c = _check(doc)
    assert "script" not in c.tags and "<script>" not in doc  # no JavaScript at all
    assert all(r.startswith(("#", "data:")) for r in c.refs), c.refs  # nothing fetched
    assert 'alt="filter &quot;3&quot; &lt;x&gt;"' in doc
    assert "@import" not in doc and "url(" not in doc  # the inlined CSS loads nothing either
    # text may mention a URL (escaped, in the config); no attribute may point at one
    assert 'src="http' not in doc and 'href="http' not in doc


def test_report_without_sections_or_config_is_valid():
    doc = render_report("Empty", [])
    _check(doc)
    assert "<nav" not in doc and "<details" not in doc


def test_comparison_section_ratio_dotted_keys_and_missing():
    runs = {"ordinary": {"instability": 0.142, "acc": 0.0, "parts": {"head": 0.2}},
            "interpretable": {"instability": 0.071, "acc": 0.9, "parts": {"head": 0.5}}}
    sec = comparison_section(runs, ["instability", "acc", "parts.head", "missing"], caption="c")
    (table,) = sec.tables
    assert table.columns == ["metric", "ordinary", "interpretable", "interpretable / ordinary"]
    assert table.rows[0] == ["instability", 0.142, 0.071, 0.5]
    assert table.rows[2] == ["parts.head", 0.2, 0.5, 2.5]
    assert math.isnan(table.rows[1][3])  # division by zero -> "–"
    assert table.rows[3][0] == "missing" and all(math.isnan(v) for v in table.rows[3][1:])
    three = comparison_section(runs | {"third": {}}, ["acc"])
    assert three.tables[0].columns == ["metric", "ordinary", "interpretable", "third"]  # no ratio
    doc = render_report("cmp", [sec])
    assert '<td class="num">0.5</td>' in doc and "<th>interpretable / ordinary</th>" in doc


def test_bad_input_is_one_clear_error():
    with pytest.raises(ReportError, match="row 1 has 2 cells, expected 3"):
        Table(["a", "b", "c"], [[1, 2, 3], [1, 2]])
    with pytest.raises(ReportError, match="png must be the bytes of a PNG"):
        Figure(b"GIF89a", "not a png")
    with pytest.raises(ReportError, match=r"sections\[0\] is a dict"):
        render_report("x", [{"title": "s"}])
    with pytest.raises(ReportError, match="runs is empty"):
        comparison_section({}, ["acc"])


def test_write_report_atomic(tmp_path, monkeypatch):
    path = write_report(tmp_path / "run" / "report.html", "Run", _sections(), config={"seed": 0})
    assert path == tmp_path / "run" / "report.html"
    assert os.listdir(path.parent) == ["report.html"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    assert path.read_text(encoding="utf-8") == render_report("Run", _sections(), config={"seed": 0})

    # a failing write keeps the old report intact and leaves no temp file
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(path, "New", [])
    monkeypatch.undo()
    assert os.listdir(path.parent) == ["report.html"] and "<title>Run</title>" in path.read_text()
    # a rendering error writes nothing at all
    with pytest.raises(ReportError):
        write_report(tmp_path / "other.html", "x", ["not a section"])
    assert not (tmp_path / "other.html").exists()
