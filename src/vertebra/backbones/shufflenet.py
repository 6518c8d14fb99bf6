"""ShuffleNet (v1).

Zhang, Zhou, Lin, Sun, "ShuffleNet: An Extremely Efficient Convolutional Neural Network for
Mobile Devices" (CVPR 2018, arXiv 1707.01083).

Table 1: conv1 3x3/2 24 (BN, ReLU), max-pool 3x3/2, Stage2/3/4 of 1+3, 1+7, 1+3 units (the first
of each with stride 2), global pool, FC. Stage output channels for g groups (1x):
g=1 144/288/576, g=2 200/400/800, g=3 240/480/960, g=4 272/544/1088, g=8 384/768/1536.
"ShuffleNet s x" multiplies every width by s (conv1 included): ``shufflenet_g3_x0_5`` and
``shufflenet_g3_x2_0`` (Table 2's 0.5x and 2x of g=3; any ``scale`` is accepted).

The unit (Fig. 2b, c): 1x1 group conv to a bottleneck of 1/4 of the output -> BN -> ReLU ->
channel shuffle -> 3x3 depthwise (stride) -> BN (no ReLU) -> 1x1 group conv -> BN; the shortcut is
the identity (added) or, for stride 2, a 3x3/2 average pool (concatenated, so the second group
conv outputs out - in channels); ReLU after the join. The first pointwise convolution of Stage2
is not grouped (Sec. 3.3: its input has only 24 channels).

Budget (Table 2): ~140 MFLOPs (mult-adds) at 1x for every g; the paper gives no parameter counts.

Features: conv1 (s2), the max-pool (s4), Stage2 (s8), Stage3 (s16), Stage4 (s32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct, DropPath, conv_bn, drop_path_rates
from ..layers.shuffle import channel_shuffle
from ..registry import register

_SN = dict(family="ShuffleNet",
           paper="ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices (CVPR 2018)",
           year=2017, arxiv="1707.01083")

_STAGE_CH = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088), 8: (384, 768, 1536)}
_REPEATS = (4, 8, 4)


class ShuffleUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, stride: int, group_first: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        mid = out_ch // 4
        self.stride, self.groups = stride, groups
        branch_out = out_ch - in_ch if stride > 1 else out_ch
        g1 = groups if group_first else 1
        for c, what in ((mid, "bottleneck"), (branch_out, "output")):
            if c % groups:
                raise ValueError(f"ShuffleNet unit: the {what} width {c} is not divisible by {groups} groups")
        self.conv1 = ConvBnAct(in_ch, mid, 1, groups=g1)
        self.conv2 = conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3 = conv_bn(mid, branch_out, 1, groups=groups)
        self.drop_path = DropPath(drop_path) if drop_path > 0 and stride == 1 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(self.conv1(x), self.groups)
        out = self.conv3(self.conv2(out))
        if self.stride > 1:
            return self.act(torch.cat((F.avg_pool2d(x, 3, self.stride, 1), out), 1))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.act(out + x)


class ShuffleNet(Backbone):
    def __init__(self, groups: int = 3, scale: float = 1.0, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__(in_chans, num_classes)
        if groups not in _STAGE_CH:
            raise ValueError(f"groups must be one of {sorted(_STAGE_CH)} (Table 1), got {groups}")
        stem = int(24 * scale)
        self.conv1 = ConvBnAct(in_chans, stem, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage_info = [FeatureInfo("conv1", stem, 2), FeatureInfo("maxpool", stem, 4)]
        rates = iter(drop_path_rates(drop_path_rate, sum(_REPEATS)))
        in_ch = stem
        for i, (n, c) in enumerate(zip(_REPEATS, _STAGE_CH[groups])):
            c = int(c * scale)
            units = []
            for j in range(n):
                units.append(ShuffleUnit(in_ch, c, groups, 2 if j == 0 else 1, group_first=(i, j) != (0, 0),
                                         drop_path=next(rates)))
                in_ch = c
            self.add_module(f"stage{i + 2}", nn.Sequential(*units))
            self.stage_info.append(FeatureInfo(f"stage{i + 2}", c, 2 ** (i + 3)))
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.conv1(x)
        yield x
        x = self.maxpool(x)
        yield x
        x = self.stage2(x)
        yield x
        x = self.stage3(x)
        yield x
        yield self.stage4(x)


@register("shufflenet_g1", **_SN, groups=1)
@register("shufflenet_g2", **_SN, groups=2)
@register("shufflenet_g3", **_SN, groups=3)
@register("shufflenet_g4", **_SN, groups=4)
@register("shufflenet_g8", **_SN, groups=8)
@register("shufflenet_g3_x0_5", **_SN, groups=3, scale=0.5)
@register("shufflenet_g3_x2_0", **_SN, groups=3, scale=2.0)
def shufflenet(**kw) -> ShuffleNet:
    return ShuffleNet(**kw)
