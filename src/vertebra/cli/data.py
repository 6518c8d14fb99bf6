"""``vertebra data shapes``: write the built-in synthetic detection set."""

from __future__ import annotations

import argparse
import time

from . import _args as A
from ._console import console, print_error

__all__ = ["register", "cmd_shapes"]


def cmd_shapes(args: argparse.Namespace) -> int:
    from ..data.shapes import write_shapes

    t0 = time.perf_counter()
    try:
        out = write_shapes(args.out, args.train, args.val, args.size, args.seed, overwrite=args.overwrite)
    except FileExistsError as e:
        print_error(e)
        return 2
    console.print(f"wrote {args.train} train + {args.val} val images ({args.size} px, seed {args.seed}) to {out} "
                  f"in {time.perf_counter() - t0:.1f} s", markup=False, highlight=False)
    return 0


def register(subparsers) -> None:
    """Add ``data`` and its subcommand ``shapes``."""
    from ..data import shapes
    from ..data.shapes import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_SIZE

    data = subparsers.add_parser("data", help="data sets: write the built-in shapes set")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("shapes", help="write the built-in synthetic detection set (COCO JSON + JPEGs)",
                       description=(shapes.__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (must not exist, be empty, or be a shapes set "
                                                "with --overwrite)")
    p.add_argument("--train", type=A.POSITIVE_INT, default=DEFAULT_NUM_TRAIN,
                   help=f"training images (default {DEFAULT_NUM_TRAIN})")
    p.add_argument("--val", type=A.COUNT, default=DEFAULT_NUM_VAL,
                   help=f"validation images (default {DEFAULT_NUM_VAL})")
    p.add_argument("--size", type=A.integer(32), default=DEFAULT_SIZE,
                   help=f"image side in px (default {DEFAULT_SIZE})")
    p.add_argument("--seed", type=A.SEED, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shapes set in --out")
    p.set_defaults(handler=cmd_shapes)
