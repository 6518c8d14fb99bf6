"""The ``vertebra`` command: one module per group of subcommands, each with ``register(subparsers)``.

``cli.bench`` (list, info, bench), ``cli.data`` (data shapes), ``cli.train`` (train, eval, predict),
``cli.export`` (export), ``cli.classify`` (classify), ``cli.weights`` (weights). Every subcommand sets
``handler``: a callable ``(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from . import bench, classify, data, export, train, weights
from ._console import console, err_console

__all__ = ["build_parser", "main", "console", "err_console"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vertebra", description="The classic CNN backbones of object detection.")
    sub = p.add_subparsers(dest="command", required=True)
    bench.register(sub)
    train.register(sub)
    classify.register(sub)
    weights.register(sub)
    export.register(sub)
    data.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        err_console.print(f"[bold red]error:[/] {escape(str(msg))}")
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
