"""Pieces the Inception line shares (GoogLeNet, BN-Inception, Inception-v2/v3/v4,
Inception-ResNet, PolyNet): parallel branches concatenated on channels, the conv-BN-ReLU
with the TF-slim BatchNorm epsilon, a backbone base class for networks with auxiliary
classifiers, and the 35/17/8 modules and grid reductions of "Rethinking the Inception
Architecture" that Inception-v2 and -v3 share.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..backbone import Backbone
from .conv_bn import ConvBnAct

__all__ = ["AuxBackbone", "Concat", "cbr", "avg_pool", "max_pool", "inception_a", "inception_b", "inception_c",
           "reduction_17", "reduction_35"]


def cbr(in_ch: int, out_ch: int, k=1, s: int = 1, p=0, eps: float = 1e-3) -> ConvBnAct:
    """conv (no bias) -> BatchNorm (eps 1e-3, as in the TF-slim/Inception releases) -> ReLU.

    Padding defaults to 0 ("VALID", the papers' V marker); pass ``p`` for "SAME" layers.
    """
    return ConvBnAct(in_ch, out_ch, k, s, p, bn_eps=eps)


class Concat(nn.Module):
    """Parallel branches applied to the same input, concatenated on channels (in order)."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


def avg_pool(count_include_pad: bool = False) -> nn.AvgPool2d:
    """The 3x3/1 average pool of the pool-projection branches ("SAME" padding)."""
    return nn.AvgPool2d(3, 1, 1, count_include_pad=count_include_pad)


def max_pool(stride: int = 2, padding: int = 0, ceil_mode: bool = False) -> nn.MaxPool2d:
    return nn.MaxPool2d(3, stride, padding, ceil_mode=ceil_mode)


# -- the modules of "Rethinking the Inception Architecture" (Szegedy et al., CVPR 2016), which
# Inception-v2 (its Table 1 network) and Inception-v3 (the released graph) share


def _pool_proj(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(avg_pool(count_include_pad=True), cbr(in_ch, out_ch, 1))


def inception_a(in_ch: int, pool_ch: int, k5: int = 5) -> Concat:
    """35x35 module (Fig. 5). ``k5=5``: the released 1x1->5x5 branch; ``k5=3``: the paper's
    factorisation of the 5x5 into a 3x3 (the double-3x3 branch is the other factorised 5x5)."""
    return Concat(
        cbr(in_ch, 64, 1),
        nn.Sequential(cbr(in_ch, 48, 1), cbr(48, 64, k5, p=k5 // 2)),
        nn.Sequential(cbr(in_ch, 64, 1), cbr(64, 96, 3, p=1), cbr(96, 96, 3, p=1)),
        _pool_proj(in_ch, pool_ch),
    )


def reduction_35(in_ch: int) -> Concat:
    """35 -> 17 grid reduction (Fig. 10): out = 384 + 96 + in_ch."""
    return Concat(
        cbr(in_ch, 384, 3, 2),
        nn.Sequential(cbr(in_ch, 64, 1), cbr(64, 96, 3, p=1), cbr(96, 96, 3, 2)),
        max_pool(),
    )


def inception_b(in_ch: int, c7: int) -> Concat:
    """17x17 module (Fig. 6, n = 7): 1x7/7x1 factorised branches, 768 out."""
    return Concat(
        cbr(in_ch, 192, 1),
        nn.Sequential(cbr(in_ch, c7, 1), cbr(c7, c7, (1, 7), p=(0, 3)), cbr(c7, 192, (7, 1), p=(3, 0))),
        nn.Sequential(cbr(in_ch, c7, 1), cbr(c7, c7, (7, 1), p=(3, 0)), cbr(c7, c7, (1, 7), p=(0, 3)),
                      cbr(c7, c7, (7, 1), p=(3, 0)), cbr(c7, 192, (1, 7), p=(0, 3))),
        _pool_proj(in_ch, 192),
    )


def reduction_17(in_ch: int) -> Concat:
    """17 -> 8 grid reduction: out = 320 + 192 + in_ch."""
    return Concat(
        nn.Sequential(cbr(in_ch, 192, 1), cbr(192, 320, 3, 2)),
        nn.Sequential(cbr(in_ch, 192, 1), cbr(192, 192, (1, 7), p=(0, 3)), cbr(192, 192, (7, 1), p=(3, 0)),
                      cbr(192, 192, 3, 2)),
        max_pool(),
    )


def _split_1x3_3x1(ch: int) -> Concat:
    return Concat(cbr(ch, 384, (1, 3), p=(0, 1)), cbr(ch, 384, (3, 1), p=(1, 0)))


def inception_c(in_ch: int) -> Concat:
    """8x8 module (Fig. 7): expanded filter-bank outputs, 2048 out."""
    return Concat(
        cbr(in_ch, 320, 1),
        nn.Sequential(cbr(in_ch, 384, 1), _split_1x3_3x1(384)),
        nn.Sequential(cbr(in_ch, 448, 1), cbr(448, 384, 3, p=1), _split_1x3_3x1(384)),
        _pool_proj(in_ch, 192),
    )


class AuxBackbone(Backbone):
    """A backbone with optional auxiliary classifiers (``self.aux_heads``, a ModuleList or None).

    Subclasses write ``_stages(x, aux)``: the stage generator that, when ``aux`` is a list,
    appends each auxiliary classifier's logits to it at its tap. ``forward`` returns
    ``(logits, aux_1, ...)`` in train mode when the heads exist (in the order of depth),
    the logits alone otherwise; ``stages``, ``forward_features`` and ``forward_levels`` never run the aux heads.
    """

    aux_heads: nn.ModuleList | None

    def _stages(self, x: Tensor, aux: list | None) -> Iterator[Tensor]:
        raise NotImplementedError

    def stages(self, x: Tensor) -> Iterator[Tensor]:
        return self._stages(x, None)

    def _aux(self, i: int, x: Tensor, aux: list | None) -> None:
        if aux is not None:
            aux.append(self.aux_heads[i](x))

    def forward(self, x: Tensor):
        if self.features_only:
            return self.forward_levels(x)
        self.check_input(x)
        aux = [] if (self.training and getattr(self, "aux_heads", None) is not None) else None
        *_, last = self._stages(x, aux)
        logits = self.forward_head(last)
        return (logits, *aux) if aux else logits
