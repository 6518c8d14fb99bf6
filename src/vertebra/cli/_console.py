"""The consoles every ``vertebra`` subcommand prints to: results on stdout, errors and warnings on stderr."""

from __future__ import annotations

import sys

from rich.console import Console

__all__ = ["console", "err_console"]

# wide tables stay readable when the output goes to a file or a pipe
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
