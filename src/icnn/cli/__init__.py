"""The ``icnn`` command line: one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` which registers its parser and sets
``func=run`` with ``run(args) -> int``. User mistakes raise ``UsageError`` (or a
``ValueError`` subclass such as ``icnn.data.DatasetError``): ``main`` prints them as one line,
``icnn: error: ...``, and exits 2 -- never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = ("train", "evaluate", "compare", "explain", "tree", "graph", "visualize", "layers")


class UsageError(ValueError):
    """A mistake in the user's arguments or files; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from icnn import __version__

    parser = argparse.ArgumentParser(
        prog="icnn",
        description="Part-interpretable CNNs: train them, explain trained CNNs, measure and show what filters encode.",
    )
    parser.add_argument("--version", action="version", version=f"icnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"icnn.cli.{name}").add_parser(sub)
    return parser


def one_line(exc: BaseException) -> str:
    """The message of a user mistake as one line; an error re-raised from a DataLoader worker
    carries the worker's traceback, whose last line is the original error."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from icnn.training.checkpoint import NonFiniteLossError

    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as exc:  # the run stopped loudly; its last checkpoint is good
        if os.environ.get("ICNN_DEBUG"):
            raise
        print(f"icnn: error: {exc}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError, FileExistsError) as exc:
        # User mistakes are reported in one line (ICNN_DEBUG=1 shows the traceback). Programming
        # errors (other exceptions) keep their traceback: they are bugs to report, not messages.
        if os.environ.get("ICNN_DEBUG"):
            raise
        print(f"icnn: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
