"""The consoles every ``vertebra`` subcommand prints to: results on stdout, errors and warnings on stderr."""

from __future__ import annotations

import sys

from rich.console import Console

__all__ = ["console", "err_console", "print_error"]

# wide tables stay readable when the output goes to a file or a pipe
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def print_error(message: object, *, label: str = "error") -> None:
    """``error: MESSAGE`` on stderr, the message printed as it is: a path or a list in brackets is not rich
    markup (``bbox must be [x, y, width, height] numbers`` would otherwise lose its brackets' text)."""
    from rich.markup import escape

    err_console.print(f"[bold red]{escape(label)}:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
