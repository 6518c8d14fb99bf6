"""The ``vertebra`` command: one module per group of subcommands, each with ``register(subparsers)``.

``cli.bench`` (list, info, bench), ``cli.data`` (data shapes), ``cli.train`` (train, eval, predict),
``cli.export`` (export). Every subcommand sets ``handler``: a callable ``(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from . import bench, data
from ._console import console, err_console

__all__ = ["build_parser", "main", "console", "err_console"]


def _command_modules() -> list:
    try:  # while cli/train.py and cli/export.py are being written
        from . import train
    except ImportError:
        train = None
    try:
        from . import export
    except ImportError:
        export = None
    return [bench, train, export, data]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vertebra", description="The classic CNN backbones of object detection.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in _command_modules():
        if module is not None:
            module.register(sub)
    if "train" not in sub.choices:
        from ..engine.commands import register_commands

        register_commands(sub)
    if "export" not in sub.choices:
        from ..export import register_commands as register_export

        register_export(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = getattr(args, "handler", None) or args.func
    try:
        return int(handler(args) or 0)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        err_console.print(f"[bold red]error:[/] {escape(str(msg))}")
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
