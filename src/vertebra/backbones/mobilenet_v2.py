"""MobileNetV2.

Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks" (CVPR 2018, arXiv 1801.04381).

Table 2: conv 3x3/2 32, then 17 inverted residual blocks (t, c, n, s) =
(1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), a 1x1 conv to
1280, average pool and a classifier. Each block (Fig. 4d, Table 1): 1x1 expansion to t*k
channels -> BN -> ReLU6 -> 3x3 depthwise (stride s on the first of a group) -> BN -> ReLU6 ->
1x1 linear projection -> BN (no activation: the linear bottleneck), with an identity shortcut
between bottlenecks when the stride is 1 and widths match (``vertebra.layers.InvertedResidual``).

Width multiplier (arch kwarg ``width_mult``, the paper's 0.35..1.4): every width is
``make_divisible(c * width_mult, 8)`` (TF-slim's rounding, never losing more than 10%); the last
1x1 conv stays 1280 for multipliers below 1 and grows above ("we do not apply the width
multiplier to the very last convolutional layer" for alpha < 1, Sec. 6.1). Registered:
``mobilenet_v2`` (1.0) and ``mobilenet_v2_0_35 / _0_5 / _0_75 / _1_3 / _1_4``.

Features: 16 (s2), 24 (s4), 32 (s8), 96 (s16), 320 (s32). The 1x1 conv to 1280 is only for
the classifier and lives in the head.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo
from ..layers import ConvBnAct, ConvClassifierHead, drop_path_rates, make_divisible
from ..layers.inverted_residual import InvertedResidual
from ..registry import register

_MBV2 = dict(family="MobileNetV2", paper="MobileNetV2: Inverted Residuals and Linear Bottlenecks (CVPR 2018)",
             year=2018, arxiv="1801.04381")

# (t, c, n, s), Table 2, grouped by the feature stride they end at
_CFG = (((1, 16, 1, 1),), ((6, 24, 2, 2),), ((6, 32, 3, 2),), ((6, 64, 4, 2), (6, 96, 3, 1)),
        ((6, 160, 3, 2), (6, 320, 1, 1)))


class MobileNetV2(Backbone):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.2, drop_path_rate: float = 0.0, round_nearest: int = 8) -> None:
        super().__init__(in_chans, num_classes)
        in_ch = make_divisible(32 * width_mult, round_nearest)
        self.stem = ConvBnAct(in_chans, in_ch, 3, 2, act=nn.ReLU6)
        rates = iter(drop_path_rates(drop_path_rate, sum(n for stage in _CFG for _, _, n, _ in stage)))
        for i, stage in enumerate(_CFG):
            blocks = []
            for t, c, n, s in stage:
                out_ch = make_divisible(c * width_mult, round_nearest)
                for j in range(n):
                    blocks.append(InvertedResidual(in_ch, out_ch, s if j == 0 else 1, t, act=nn.ReLU6,
                                                   drop_path=next(rates)))
                    in_ch = out_ch
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
            self.stage_info.append(FeatureInfo(f"stage{i + 1}", in_ch, 2 ** (i + 1)))
        last = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        self.head = ConvClassifierHead(in_ch, last, num_classes, drop_rate, act=nn.ReLU6)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def stages(self, x: Tensor):
        x = self.stage1(self.stem(x))
        yield x
        x = self.stage2(x)
        yield x
        x = self.stage3(x)
        yield x
        x = self.stage4(x)
        yield x
        yield self.stage5(x)


@register("mobilenet_v2", **_MBV2, references=("timm:mobilenetv2_100",), width_mult=1.0)
@register("mobilenet_v2_0_35", **_MBV2, references=("timm:mobilenetv2_035",), width_mult=0.35)
@register("mobilenet_v2_0_5", **_MBV2, references=("timm:mobilenetv2_050",), width_mult=0.5)
@register("mobilenet_v2_0_75", **_MBV2, references=("timm:mobilenetv2_075",), width_mult=0.75)
@register("mobilenet_v2_1_3", **_MBV2, width_mult=1.3)
@register("mobilenet_v2_1_4", **_MBV2, references=("timm:mobilenetv2_140",), width_mult=1.4)
def mobilenet_v2(**kw) -> MobileNetV2:
    return MobileNetV2(**kw)
