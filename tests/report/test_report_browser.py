"""The written report in headless Chromium: it renders (non-blank screenshot) with no console errors.

Skipped when ``chromium`` is not installed (Debian: ``apt-get install chromium``).
"""

import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from icnn.report import Figure, Section, comparison_section, filter_panel, metric_bars, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

# Console output that means the page broke: uncaught JS errors, error-level console messages.
CONSOLE_ERROR = re.compile(r"Uncaught|(ERROR|FATAL):CONSOLE")


def _screenshot(page, tmp_path, size="1280,2000"):
    """Opens ``page`` offline in headless Chromium; returns (screenshot RGB array, console error lines)."""
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # belt and braces: no name resolves, nothing is fetched
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size={size}",
        "--enable-logging=stderr", "--v=0", page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.exists(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    errors = [line for line in proc.stderr.splitlines() if CONSOLE_ERROR.search(line)]
    return np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")), errors


def test_report_renders_in_chromium(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((5, 5))
    rf = np.zeros((20, 20), dtype=bool)
    rf[5:12, 8:15] = True
    runs = {"ordinary": {"instability": 0.142, "acc": 0.93}, "interpretable": {"instability": 0.071, "acc": 0.925}}
    sec = comparison_section(runs, ["instability", "acc"], caption="ordinary vs interpretable")
    sec.figures.append(Figure(metric_bars(runs, "instability", references={"random": 0.161}), "instability"))
    sections = [sec, Section("Filters", figures=[Figure(filter_panel(rng.random((3, 20, 20)), x, x - 0.5, x, rf),
                                                        "filter 0", wide=True)])]
    page = write_report(tmp_path / "report.html", "icnn report", sections, config={"arch": "vgg16"})
    pixels, errors = _screenshot(page, tmp_path)
    assert pixels.shape == (2000, 1280, 3)
    assert not errors, errors
    # not blank: many colours (text, table lines, figures), and dark text on the white page
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200
    assert (pixels.min(axis=-1) < 60).mean() > 0.002 and (pixels.min(axis=-1) > 245).mean() > 0.5


def test_console_error_detection_works(tmp_path):
    # the check above must be able to fail: a page with a JS error is caught
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>x</title></head><body><p>x</p>'
                    '<script>throw new Error("kaput")</script></body></html>')
    _, errors = _screenshot(page, tmp_path, size="320,200")
    assert any("kaput" in line for line in errors), errors
