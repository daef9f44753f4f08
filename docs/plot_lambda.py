"""Plot location instability and accuracy against the filter-loss weight, mean and spread over seeds.

    python docs/plot_lambda.py --out docs/lambda_cub.png LABEL=RUN [LABEL=RUN ...]

Each RUN is one ordinary/interpretable pair, given as
  - an ``icnn compare`` output directory (its ``metrics.json``),
  - ``ORDINARY_DIR+INTERPRETABLE_DIR``: two ``icnn evaluate`` output directories, or
  - a ``benchmarks/cub_probe.py`` log (its last line: the JSON of both twins).
LABEL names the run's filter-loss setting on the x axis (e.g. ``"0.6/t"``); runs given the same
label (other seeds) are drawn as their mean with min-max bars. The ordinary twins of all runs
make the point at x = "ordinary"; the random-unit and best-fixed-unit references are the first
run's (an ordinary twin shared by several runs counts once).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class PlotError(ValueError):
    pass


def _metrics(path: Path, missing: str) -> dict:
    """``path/metrics.json``, or PlotError(``missing``)."""
    file = path / "metrics.json"
    if not file.is_file():
        raise PlotError(missing)
    return json.loads(file.read_text())


def _evaluate_dir(path: Path) -> dict:
    file = path / "metrics.json"
    m = _metrics(path, f"{file}: no such file")
    kinds = [k for k in ("ordinary", "interpretable") if k in m]
    if len(kinds) != 1:
        raise PlotError(f"{file}: expected the metrics.json of one `icnn evaluate` run")
    return m[kinds[0]]


def read_pair(spec: str) -> tuple[dict, dict]:
    """``(ordinary, interpretable)`` dicts with ``accuracy``, ``location_instability`` and
    ``instability_references`` from one RUN spec (see the module docstring)."""
    if "+" in spec:
        ordinary, interpretable = spec.split("+", 1)
        return _evaluate_dir(Path(ordinary)), _evaluate_dir(Path(interpretable))
    path = Path(spec)
    if path.is_file():  # a cub_probe log: the last line is {"args": ..., "res": {"ordinary": ..., "interp": ...}}
        lines = [ln for ln in path.read_text().splitlines() if ln.startswith("{")]
        if not lines or "res" not in json.loads(lines[-1]):
            raise PlotError(f"{path}: not a finished cub_probe.py log (no result line)")
        res = json.loads(lines[-1])["res"]
        conv = lambda r: {"accuracy": r["acc"], "location_instability": r["instab"],  # noqa: E731
                          "instability_references": {k: r[k] for k in ("random_unit", "best_fixed_unit")}}
        return conv(res["ordinary"]), conv(res["interp"])
    m = _metrics(path, f"{spec}: neither a compare run, an ORDINARY+INTERPRETABLE pair nor a probe log")
    return m["ordinary"], m["interpretable"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)

    groups: dict[str, list[tuple[dict, dict]]] = {}
    try:
        for item in args.runs:
            label, sep, spec = item.partition("=")
            if not sep:
                raise PlotError(f"{item}: expected LABEL=RUN")
            groups.setdefault(label, []).append(read_pair(spec))
    except PlotError as exc:
        print(f"plot_lambda: {exc}", file=sys.stderr)
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = [p for g in groups.values() for p in g]
    names = ["ordinary", *groups]
    ordinary = list({(o["accuracy"], o["location_instability"]): o for o, _ in pairs}.values())  # a twin shared by runs: once
    inst = [[o["location_instability"] for o in ordinary]] + [[i["location_instability"] for _, i in g] for g in groups.values()]
    acc = [[100 * o["accuracy"] for o in ordinary]] + [[100 * i["accuracy"] for _, i in g] for g in groups.values()]
    refs = pairs[0][0]["instability_references"]
    xs = np.arange(len(names))

    def mean_bars(rows):
        mean = np.array([np.mean(r) for r in rows])
        return mean, np.array([[m - min(r) for m, r in zip(mean, rows)], [max(r) - m for m, r in zip(mean, rows)]])

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    m, bars = mean_bars(inst)
    ax.errorbar(xs, m, yerr=bars, fmt="o-", color="tab:blue", capsize=3, label="location instability")
    ax.axhline(refs["random_unit"], color="tab:blue", ls=":", lw=1, label="random unit")
    ax.axhline(refs["best_fixed_unit"], color="tab:blue", ls="--", lw=1, label="best fixed unit")
    ax.axhline(0.6 * m[0], color="tab:green", ls="-.", lw=1, label="0.6x ordinary")
    ax.set_ylabel("location instability (lower = more stable)")
    ax.set_xticks(list(xs), [f"{n}\n(n={len(r)})" for n, r in zip(names, inst)], fontsize=8)
    ax.set_xlabel("filter-loss weight lambda")
    ax2 = ax.twinx()
    m, bars = mean_bars(acc)
    ax2.errorbar(xs, m, yerr=bars, fmt="s-", color="tab:red", capsize=3, label="accuracy (%)")
    ax2.set_ylabel("test accuracy (%)", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    if args.title:
        ax.set_title(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
