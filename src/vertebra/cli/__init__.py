"""The ``vertebra`` command: one module per group of subcommands, each with ``register(subparsers)``.

``cli.bench`` (list, info, bench), ``cli.compare`` (compare), ``cli.data`` (data shapes, data stats),
``cli.train`` (train, eval, predict),
``cli.export`` (export), ``cli.classify`` (classify), ``cli.weights`` (weights). Every subcommand sets
``handler``: a callable ``(args) -> exit code``, and may set ``_check``: a callable ``(args)`` that raises
:class:`~._args.UsageError` for flags that do not fit together, reported as argparse's usage error before the
handler runs. Every flag's value is typed and bounded where it is parsed (:mod:`._args`).
"""

from __future__ import annotations

import argparse
import sys

from . import bench, classify, compare, data, export, train, weights
from ._args import HelpFormatter, UsageError
from ._console import console, err_console, print_error

__all__ = ["build_parser", "main", "console", "err_console"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="vertebra", description="The classic CNN backbones of object detection.")
    p.add_argument("--version", action="version", version=f"vertebra {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    bench.register(sub)
    train.register(sub)
    compare.register(sub)
    classify.register(sub)
    weights.register(sub)
    export.register(sub)
    data.register(sub)
    _each_parser(p, lambda q: setattr(q, "formatter_class", HelpFormatter))  # every flag's help shows its default
    return p


def _each_parser(p: argparse.ArgumentParser, fn) -> None:
    fn(p)
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for q in action.choices.values():
                _each_parser(q, fn)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:  # train --config: the run's settings, the flags given on top
        try:
            args._parser.set_defaults(**train.config_defaults(args.config))
        except ValueError as e:
            args._parser.error(f"argument --config: {e}")
        args = parser.parse_args(argv)
    if getattr(args, "_explicit_wanted", False):  # train: which flags were given (a preset fills the others)
        from ._args import explicit_dests

        args._explicit = explicit_dests(parser, args._parser, argv if argv is not None else sys.argv[1:])
    check = getattr(args, "_check", None)
    if check is not None:
        try:
            check(args)
        except UsageError as e:  # the sub-command's own usage line, as argparse words a bad value
            getattr(args, "_parser", parser).error(f"argument {e.flag}: {e}")
    from ..devices import keep_freed_memory

    keep_freed_memory()  # the commands run models: reuse freed memory instead of faulting in fresh pages
    try:
        return int(args.handler(args) or 0)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print_error(msg)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
