"""Plot location instability and accuracy against the filter-loss weight from `icnn compare` runs.

    python docs/plot_lambda.py --out docs/lambda_cub.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Each RUN_DIR holds the ``metrics.json`` of one ``icnn compare`` run; LABEL names its filter-loss
setting on the x axis (e.g. ``"0.01/t"``). The ordinary twin of the first run is drawn as the
reference at x = "ordinary", with the random-unit and best-fixed-unit reference lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, metrics = [], []
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            print(f"plot_lambda: {item}: expected LABEL=RUN_DIR", file=sys.stderr)
            return 2
        file = Path(path) / "metrics.json"
        if not file.is_file():
            print(f"plot_lambda: {file}: no such file", file=sys.stderr)
            return 2
        labels.append(label)
        metrics.append(json.loads(file.read_text()))

    base = metrics[0]["ordinary"]
    names = ["ordinary", *labels]
    inst = [base["location_instability"], *[m["interpretable"]["location_instability"] for m in metrics]]
    acc = [100 * base["accuracy"], *[100 * m["interpretable"]["accuracy"] for m in metrics]]
    refs = base["instability_references"]
    xs = range(len(names))

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(xs, inst, "o-", color="tab:blue", label="location instability")
    ax.axhline(refs["random_unit"], color="tab:blue", ls=":", lw=1, label="random unit")
    ax.axhline(refs["best_fixed_unit"], color="tab:blue", ls="--", lw=1, label="best fixed unit")
    ax.axhline(0.6 * base["location_instability"], color="tab:green", ls="-.", lw=1, label="0.6x ordinary")
    ax.set_ylabel("location instability (lower = more stable)")
    ax.set_xticks(list(xs), names)
    ax.set_xlabel("filter-loss weight lambda")
    ax2 = ax.twinx()
    ax2.plot(xs, acc, "s-", color="tab:red", label="accuracy (%)")
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
