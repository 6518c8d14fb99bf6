"""The pre-BatchNorm blocks of AlexNet (Krizhevsky et al., NIPS 2012) that ZFNet (Zeiler and
Fergus, ECCV 2014) reuses: a convolution with bias followed by ReLU, and the local response
normalisation of Sec. 3.3."""

from __future__ import annotations

from torch import nn

from .conv_bn import ConvBnAct

__all__ = ["conv_relu", "lrn"]


def lrn() -> nn.LocalResponseNorm:
    """Sec. 3.3: k=2, n=5, alpha=1e-4, beta=0.75 as the paper writes it (alpha not divided by n)."""
    return nn.LocalResponseNorm(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)


def conv_relu(in_ch: int, out_ch: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> ConvBnAct:
    """Convolution with bias and ReLU, no BatchNorm (children ``conv``, ``act``)."""
    return ConvBnAct(in_ch, out_ch, k, stride, padding, groups=groups, bias=True, bn=False)
