"""Pieces the Inception line shares (GoogLeNet, BN-Inception, Inception-v2/v3/v4,
Inception-ResNet, PolyNet): parallel branches concatenated on channels, the conv-BN-ReLU
with the TF-slim BatchNorm epsilon, and a backbone base class for networks with auxiliary
classifiers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..backbone import Backbone
from .conv_bn import ConvBnAct

__all__ = ["AuxBackbone", "Concat", "cbr", "avg_pool", "max_pool", "no_drop_path"]


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


def no_drop_path(name: str, rate: float) -> None:
    """Non-residual networks accept ``drop_path_rate`` only at 0."""
    if rate:
        raise ValueError(f"{name} has no residual branches: drop_path_rate must be 0, got {rate}")


class AuxBackbone(Backbone):
    """A backbone with optional auxiliary classifiers (``self.aux_heads``, a ModuleList or None).

    Subclasses write ``_stages(x, aux)``: the stage generator that, when ``aux`` is a list,
    appends each auxiliary classifier's logits to it at its tap. ``forward`` returns
    ``(logits, aux_1, ...)`` in train mode when the heads exist (in the order of depth),
    the logits alone otherwise; ``stages``/``forward_features`` never run the aux heads.
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
            return self.forward_features(x)
        self.check_input(x)
        aux = [] if (self.training and getattr(self, "aux_heads", None) is not None) else None
        *_, last = self._stages(x, aux)
        logits = self.forward_head([last])
        return (logits, *aux) if aux else logits
