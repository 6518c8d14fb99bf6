"""PyramidNet: Han, Kim & Kim, "Deep Pyramidal Residual Networks" (CVPR 2017, arXiv 1610.02915).

Instead of doubling the width at each downsampling, a PyramidNet widens every residual unit
a little: with additive widening (Eq. 2) unit k of N is D_k = D_{k-1} + alpha / N wide
(rounded per unit), so the last unit is 16 + alpha (CIFAR) or 64 + alpha (ImageNet) wide.

- Unit (Fig. 6d): BN - conv - BN - ReLU - conv - BN (no ReLU on the way in, a BN at the end,
  no ReLU after the addition); the bottleneck unit is BN - 1x1 - BN - ReLU - 3x3 - BN - ReLU -
  1x1 (4x the width) - BN.
- Shortcut: the identity, zero-padded with the channels the unit adds (Sec. 3.2, "zero-padded
  identity-mapping shortcut"); at a downsampling unit a 2x2/2 average pool first. No
  projection anywhere.
- CIFAR (Table 4): a 3x3 convolution of 16 channels with BN, three stages of N/3 units at
  32/16/8 pixels (downsampling in the first unit of stages 2 and 3), BN-ReLU, global pooling,
  FC. Basic units for depth 6n+2 (110 layers: 18 units a stage), bottleneck units for 9n+2
  (164: 18, 272: 30).
- ImageNet (Table 5): the ResNet stem (7x7/2, 64, BN-ReLU, 3x3/2 max-pool) and four stages
  of bottleneck units, PyramidNet-200 with (3, 24, 36, 3) units; alpha = 300 or 450.

Features: CIFAR ``layer1``..``layer3`` at strides 1, 2, 4; ImageNet ``stem`` (s2) and
``layer1``..``layer4`` (s4..s32), their widths following the schedule. The last stage carries
the final BN-ReLU. ``drop_path_rate`` drops the residual branch (stochastic depth).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct, DropPath, conv_bn, drop_path_rates
from ..registry import register

_PYRAMIDNET = dict(family="PyramidNet", paper="Deep Pyramidal Residual Networks (CVPR 2017)", year=2016,
                   arxiv="1610.02915")

_IMAGENET_LAYERS = {
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


class PyramidBasic(nn.Module):
    """BN - 3x3 conv - BN - ReLU - 3x3 conv - BN."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.conv1 = ConvBnAct(in_ch, width, 3, stride)
        self.conv2 = conv_bn(width, width, 3)
        self.out_channels = width
        self.shortcut = ZeroPadShortcut(in_ch, width, stride)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(self.bn(x)))
        return self.drop_path(out) + self.shortcut(x)


class PyramidBottleneck(nn.Module):
    """BN - 1x1 conv - BN - ReLU - 3x3 conv - BN - ReLU - 1x1 conv (4x width) - BN."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_ch = width * self.expansion
        self.bn = nn.BatchNorm2d(in_ch)
        self.conv1 = ConvBnAct(in_ch, width, 1)
        self.conv2 = ConvBnAct(width, width, 3, stride)
        self.conv3 = conv_bn(width, out_ch, 1)
        self.out_channels = out_ch
        self.shortcut = ZeroPadShortcut(in_ch, out_ch, stride)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(self.conv2(self.conv1(self.bn(x))))
        return self.drop_path(out) + self.shortcut(x)


class ZeroPadShortcut(nn.Module):
    """The identity (2x2/2 average-pooled at a downsampling unit), zero-padded to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"a zero-padded shortcut cannot narrow {in_ch} to {out_ch} channels")
        self.pad = out_ch - in_ch
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = self.pool(x)
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x


def _widths(start: int, alpha: float, n_units: int) -> list[int]:
    """The additive schedule: unit k is round(start + k * alpha / N) wide (k = 1..N)."""
    step = alpha / n_units
    return [int(round(start + (k + 1) * step)) for k in range(n_units)]


class PyramidNet(Backbone):
    """PyramidNet with additive widening, CIFAR (``cifar=True``) or ImageNet layout."""

    def __init__(self, depth: int, alpha: float, bottleneck: bool = False, cifar: bool = True,
                 num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes)
        self.cifar = cifar
        block = PyramidBottleneck if bottleneck else PyramidBasic
        if cifar:
            per = 9 if bottleneck else 6
            if (depth - 2) % per:
                raise ValueError(f"a CIFAR PyramidNet with {'bottleneck' if bottleneck else 'basic'} units has "
                                 f"{per}n+2 layers, got depth {depth}")
            layers = (((depth - 2) // per),) * 3
            start = 16
            self.min_input_size = 8
            self.stem = conv_bn(in_chans, start, 3)
            strides = (1, 2, 4)
        else:
            if depth not in _IMAGENET_LAYERS:
                raise ValueError(f"ImageNet PyramidNet depths are {sorted(_IMAGENET_LAYERS)}, got {depth}")
            if not bottleneck:
                raise ValueError("the ImageNet PyramidNets use bottleneck units (bottleneck=True)")
            layers = _IMAGENET_LAYERS[depth]
            start = 64
            self.stem = ConvBnAct(in_chans, start, 7, 2, 3)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.stage_info.append(FeatureInfo("stem", start, 2))
            strides = (4, 8, 16, 32)
        widths = iter(_widths(start, alpha, sum(layers)))
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        in_ch = start
        for i, n in enumerate(layers):
            units = []
            for j in range(n):
                unit = block(in_ch, next(widths), 2 if (i and j == 0) else 1, next(rates))
                in_ch = unit.out_channels
                units.append(unit)
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
            self.stage_info.append(FeatureInfo(f"layer{i + 1}", in_ch, strides[i]))
        self.final_bn = nn.BatchNorm2d(in_ch)
        self.final_act = nn.ReLU(inplace=True)
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.stem(x)
        if not self.cifar:
            yield x
            x = self.pool(x)
        n = len(self.stage_info) - (0 if self.cifar else 1)
        for i in range(1, n + 1):
            x = getattr(self, f"layer{i}")(x)
            if i == n:
                x = self.final_act(self.final_bn(x))
            yield x


@register("pyramidnet110_a48", **_PYRAMIDNET, depth=110, alpha=48)
@register("pyramidnet110_a270", **_PYRAMIDNET, depth=110, alpha=270)
@register("pyramidnet164_a270_bottleneck", **_PYRAMIDNET, depth=164, alpha=270, bottleneck=True)
@register("pyramidnet272_a200_bottleneck", **_PYRAMIDNET, depth=272, alpha=200, bottleneck=True)
@register("pyramidnet200_a300", **_PYRAMIDNET, depth=200, alpha=300, bottleneck=True, cifar=False)
@register("pyramidnet200_a450", **_PYRAMIDNET, depth=200, alpha=450, bottleneck=True, cifar=False)
def pyramidnet(**kw) -> PyramidNet:
    return PyramidNet(**kw)
