"""The argparse types of every ``vertebra`` command: each flag's value is checked where it is parsed, so a bad one
ends in argparse's one-line usage error naming the flag, the value and what is allowed, before anything is read,
built or written. ``None`` is the only "not given"; no value is ever tested for truth.

Checks that need two flags or a built model (a size against the backbone's smallest input, ``--amp fp16`` on a
CPU) are a command's ``check(args)``: it raises :class:`UsageError`, which :func:`vertebra.cli.main` reports the
same way.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

__all__ = ["UsageError", "Renamed", "HelpFormatter", "explicit_dests", "integer", "number", "existing_file",
           "existing_dir",
           "file_or_url", "device",
           "POSITIVE_INT", "COUNT", "SEED", "SIZE", "POSITIVE", "NON_NEGATIVE", "FRACTION", "PROBABILITY",
           "check_size_for", "check_precision"]


class UsageError(ValueError):
    """A flag's value that does not fit the others (raised by a command's ``check``): ``flag`` names it."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


def _bound(lo, hi, lo_open: bool, hi_open: bool, what: str) -> str:
    def f(v) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{f(lo)}, {f(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {f(lo)}"
    return f"{what} {'<' if hi_open else '<='} {f(hi)}"


def _typed(func: Callable[[str], object], name: str, **bounds) -> Callable[[str], object]:
    func.__name__ = name  # argparse words its fallback message with the type's name
    func.bounds = bounds  # what the type allows, for the tests that walk every flag with a bad value
    return func


def _ranged(kind: type, lo, hi, lo_open: bool, hi_open: bool) -> Callable[[str], object]:
    """An argparse type: a finite ``kind`` (int or float) within the bounds (either may be None)."""
    what = "an integer" if kind is int else "a number"
    allowed = _bound(lo, hi, lo_open, hi_open, what) if lo is not None or hi is not None else \
        ("an integer" if kind is int else "a finite number")

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {allowed}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {allowed} (finite)")
        below = lo is not None and (v < lo or (lo_open and v == lo))
        if below or (hi is not None and (v > hi or (hi_open and v == hi))):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {allowed}")
        return v

    return _typed(parse, allowed, kind=kind, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (either bound may be None)."""
    return _ranged(int, lo, hi, False, False)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number within the bounds (open or closed at each end)."""
    return _ranged(float, lo, hi, lo_open, hi_open)


POSITIVE_INT = integer(1)  # batches, epochs, steps, threads, runs
COUNT = integer(0)  # workers, warm-up steps, images
SEED = integer(0, 2**32 - 1)  # what numpy's and torch's generators take
SIZE = integer(16)  # input sizes: each command also checks them against its network's smallest input
POSITIVE = number(0, lo_open=True)  # learning rates, minutes, norms
NON_NEGATIVE = number(0)  # weight decay, loss weights, tolerances
FRACTION = number(0, 1, hi_open=True)  # EMA decay, label smoothing
PROBABILITY = number(0, 1)  # score thresholds


def _existing(want_dir: bool) -> Callable[[str], str]:
    what, other = ("folder", "file") if want_dir else ("file", "folder")

    def parse(text: str) -> str:
        p = Path(text)
        if p.exists() and p.is_dir() != want_dir:
            raise argparse.ArgumentTypeError(f"{text!r} is a {other}, not a {what}")
        if not p.exists():
            raise argparse.ArgumentTypeError(f"{text!r}: no such {what}")
        return text

    return _typed(parse, f"existing {what}")


existing_file = _existing(False)  # an argparse type: a path to a file that exists
existing_dir = _existing(True)  # an argparse type: a path to a folder that exists


def file_or_url(text: str) -> str:
    """An argparse type: an http(s) URL, or a path to a file that exists."""
    from ..hub import is_url

    return text if is_url(text) else existing_file(text)


def device(text: str) -> str:
    """An argparse type: a device this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    from ..devices import check_device

    try:
        check_device(text, flag="")
    except ValueError as e:  # " NAME: why" -> "invalid value 'NAME': why"
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {str(e).split(': ', 1)[-1]}") from None
    return text


for _f, _name in ((file_or_url, "file or URL"), (device, "device")):
    _typed(_f, _name)


# --------------------------------------------------------------------------------------------- words


class Renamed(argparse.Action):
    """An old spelling of a flag, kept for one release: it stores into the new flag's dest (``const`` for a flag
    without a value, as ``--bf16`` for ``--dtype bf16``) and says on stderr what the flag is called now. Hidden from
    ``--help``."""

    def __init__(self, option_strings, dest, *, new: str, nargs=None, const=None, **kw):
        kw.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        import sys

        value = self.const if values is None or values == [] else values
        shown = f"{self.new} {value}" if self.nargs != 0 else f"{self.new} {self.const}"
        print(f"warning: {option_string} is now {shown} (the old spelling goes after this release)", file=sys.stderr)
        setattr(namespace, self.dest, value)


class _Unset:
    """The default every flag gets while :func:`explicit_dests` parses: what is still it was not given."""


def explicit_dests(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests of the flags ``argv`` gives to the sub-command ``sub`` of ``parser`` (not those left at their
    defaults): a second parse in which every default of ``sub`` is a marker. A preset fills only the others."""
    import contextlib
    import io

    unset = _Unset()
    saved = [(a, a.default) for a in sub._actions]
    saved_defaults = dict(sub._defaults)
    try:
        for a, default in saved:
            if default is not argparse.SUPPRESS:
                # append actions copy their default before appending: None starts them from an empty list
                a.default = None if isinstance(a, argparse._AppendAction) else unset
        sub._defaults = {}
        with contextlib.redirect_stderr(io.StringIO()):  # Renamed's warnings were printed by the real parse
            ns = parser.parse_args(argv)
    finally:
        for a, default in saved:
            a.default = default
        sub._defaults = saved_defaults
    return {k for k, v in vars(ns).items() if v is not unset and v is not None and not k.startswith("_")}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, with each flag's default appended where its help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, [], argparse.SUPPRESS) or not action.option_strings
                or action.nargs == 0):
            return text
        return f"{text} (default: {default})"


# --------------------------------------------------------------------------------------------- cross-flag checks


def check_size_for(backbone: str, sizes: dict[str, int | None], backbone_kwargs: dict | None = None) -> None:
    """Raise :class:`UsageError` for a size (``{flag: value}``) below ``backbone``'s smallest input. An unknown
    backbone or bad build arguments are left to the command, which reports them with the registry's words."""
    given = {flag: v for flag, v in sizes.items() if v is not None}
    if not given:
        return
    import torch

    from ..registry import create_backbone

    try:
        with torch.device("meta"):
            smallest = int(getattr(create_backbone(backbone, **(backbone_kwargs or {})), "min_input_size", 1))
    except Exception:  # noqa: BLE001 - the command itself reports an unknown backbone or argument
        return
    for flag, v in given.items():
        if v < smallest:
            raise UsageError(flag, f"invalid value {v}: {backbone} needs inputs of at least {smallest} px")


def check_precision(amp: str | None, device_name: str, flag: str) -> None:
    """Raise :class:`UsageError` where ``device_name`` cannot run the mixed precision ``amp`` (bf16 / fp16)."""
    from ..precision import check_dtype

    try:
        check_dtype(amp, device_name, flag=flag)
    except ValueError as e:
        raise UsageError(flag.split()[0], str(e).split(": ", 1)[-1]) from None
