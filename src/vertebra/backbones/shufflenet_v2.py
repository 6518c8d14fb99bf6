"""ShuffleNet V2.

Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design" (ECCV 2018, arXiv 1807.11164).

Table 5: conv1 3x3/2 24 (BN, ReLU), max-pool 3x3/2, Stage2/3/4 of 4/8/4 units, conv5 1x1,
global pool, FC. Output channels of Stage2/3/4 and conv5 per size:
0.5x 48/96/192/1024, 1x 116/232/464/1024, 1.5x 176/352/704/1024, 2x 244/488/976/2048.

The unit (Fig. 3c): a channel split in halves; one half is the identity, the other runs
1x1 conv-BN-ReLU -> 3x3 depthwise-BN -> 1x1 conv-BN-ReLU; the halves are concatenated and
shuffled (2 groups). The downsampling unit (Fig. 3d) has no split: both branches see the whole
input, the left one 3x3 depthwise/2-BN -> 1x1 conv-BN-ReLU, the right one as above with a
stride-2 depthwise; concatenation doubles the channels, then the shuffle.

Features: 24 (s2, conv1), 24 (s4, after the max-pool), Stage2 (s8), Stage3 (s16), Stage4
(s32). conv5 (1x1 to 1024/2048, BN, ReLU) exists for the classifier and sits in the head
(``head.conv``, a ``vertebra.layers.ConvClassifierHead``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ConvBnAct, ConvClassifierHead, conv_bn
from ..layers.shuffle import channel_shuffle
from ..registry import register

_SNV2 = dict(family="ShuffleNet V2",
             paper="ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design (ECCV 2018)",
             year=2018, arxiv="1807.11164", supports_drop_path=False)

_WIDTHS = {0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024), 1.5: (176, 352, 704, 1024),
           2.0: (244, 488, 976, 2048)}
_REPEATS = (4, 8, 4)


class ShuffleV2Unit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = out_ch // 2
        if stride == 1 and in_ch != out_ch:
            raise ValueError(f"a stride-1 unit keeps its width, got {in_ch} -> {out_ch}")
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(in_ch, in_ch, 3, stride, groups=in_ch), ConvBnAct(in_ch, half, 1))
        else:
            self.branch1 = None
        b2_in = in_ch if stride > 1 else half
        self.branch2 = nn.Sequential(ConvBnAct(b2_in, half, 1), conv_bn(half, half, 3, stride, groups=half),
                                     ConvBnAct(half, half, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(Backbone):
    def __init__(self, width: float = 1.0, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__(in_chans, num_classes)
        if width not in _WIDTHS:
            raise ValueError(f"width must be one of {sorted(_WIDTHS)} (Table 5), got {width}")
        *stage_ch, last = _WIDTHS[width]
        self.conv1 = ConvBnAct(in_chans, 24, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage_info = [FeatureInfo("conv1", 24, 2), FeatureInfo("maxpool", 24, 4)]
        in_ch = 24
        for i, (n, c) in enumerate(zip(_REPEATS, stage_ch)):
            units = [ShuffleV2Unit(in_ch if j == 0 else c, c, 2 if j == 0 else 1) for j in range(n)]
            in_ch = c
            self.add_module(f"stage{i + 2}", nn.Sequential(*units))
            self.stage_info.append(FeatureInfo(f"stage{i + 2}", c, 2 ** (i + 3)))
        self.head = ConvClassifierHead(in_ch, last, num_classes, drop_rate)  # conv5 is head.conv
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


@register("shufflenet_v2_x0_5", **_SNV2, width=0.5)
@register("shufflenet_v2_x1_0", **_SNV2, width=1.0)
@register("shufflenet_v2_x1_5", **_SNV2, width=1.5)
@register("shufflenet_v2_x2_0", **_SNV2, width=2.0)
def shufflenet_v2(**kw) -> ShuffleNetV2:
    return ShuffleNetV2(**kw)
