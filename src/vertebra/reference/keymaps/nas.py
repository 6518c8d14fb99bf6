"""timm ``nasnetalarge`` and ``pnasnet5large`` keys -> vertebra.backbones.nas.

Both timm models name their cells one by one (``cell_stem_0``, ``cell_3``, ``reduction_cell_1``)
and the two operations of block j ``comb_iter_j_left`` / ``_right``; vertebra keeps the cells in
one list (``cells.K``, in the order they run, stem cells first) and each cell's operations in
``ops.{2j}`` / ``ops.{2j+1}``.
"""

from __future__ import annotations

import re

from . import keymap

_INNER = [
    (r"^conv_prev_1x1\.path_(\d)\.conv\.", r"pre0.conv\1."),  # PNASNet factorized reduction
    (r"^conv_prev_1x1\.final_path_bn\.", "pre0.bn."),
    (r"^path_(\d)\.conv\.", r"pre0.conv\1."),  # NASNet factorized reduction (FirstCell, stem 1)
    (r"^final_path_bn\.", "pre0.bn."),
    (r"^conv_prev_1x1\.", "pre0."),
    (r"^conv_1x1\.", "pre1."),
]
_OP = [
    (r"^separable_(\d)\.depthwise_conv2d\.", r"dw\1."),
    (r"^separable_(\d)\.pointwise_conv2d\.", r"pw\1."),
    (r"^bn_sep_(\d)\.", r"bn\1."),
]
_COMB = re.compile(r"^comb_iter_(\d)_(left|right)\.(.*)$")


def _sub(key: str, rules) -> str:
    """The key renamed by the first rule that matches it."""
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


def _cell_key(rest: str) -> str:
    m = _COMB.match(rest)
    if m:
        j, side, tail = int(m.group(1)), m.group(2), m.group(3)
        return f"ops.{2 * j + (side == 'right')}.{_sub(tail, _OP)}"
    return _sub(rest, _INNER)


def _convert(sd, cell_index) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("last_linear."):
            out["head.fc." + k[len("last_linear."):]] = v
        elif k.startswith(("conv0.", "conv_0.")):
            out["conv0." + k.split(".", 1)[1]] = v
        else:
            top, rest = k.split(".", 1)
            out[f"cells.{cell_index(top)}.{_cell_key(rest)}"] = v
    return out


@keymap("timm", "nasnet_a_large")
def nasnet_keys(sd, model):
    n = sum(1 for k in sd if re.match(r"^cell_\d+\.conv_1x1\.conv\.weight$", k)) // 3  # normal cells per stack

    def index(top: str) -> int:
        if top.startswith("cell_stem_"):
            return int(top[-1])
        if top.startswith("reduction_cell_"):
            r = int(top.rsplit("_", 1)[1])
            return 2 + (r + 1) * n + r
        i = int(top.rsplit("_", 1)[1])
        return 2 + i + i // n

    return _convert(sd, index)


@keymap("timm", "pnasnet5_large")
def pnasnet_keys(sd, model):
    def index(top: str) -> int:
        if top.startswith("cell_stem_"):
            return int(top[-1])
        return 2 + int(top.rsplit("_", 1)[1])

    return _convert(sd, index)
