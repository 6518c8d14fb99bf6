"""MnasNet.

Tan, Chen, Pang, Vasudevan, Sandler, Howard, Le, "MnasNet: Platform-Aware Neural Architecture
Search for Mobile" (CVPR 2019, arXiv 1807.11626).

- ``mnasnet_a1`` (Fig. 7(a), the paper's headline model: 3.9M parameters, 312M mult-adds,
  75.2% top-1): conv 3x3/2 32; SepConv 3x3 16; MBConv6 3x3 24 x2 (s2); MBConv3 5x5 SE 40 x3 (s2);
  MBConv6 3x3 80 x4 (s2); MBConv6 3x3 SE 112 x2; MBConv6 5x5 SE 160 x3 (s2); MBConv6 3x3 320 x1;
  then the classifier (1x1 conv 1280, pool, FC). MBConv is MobileNetV2's inverted residual with
  ReLU (``vertebra.layers.InvertedResidual``); its squeeze-and-excitation
  (``vertebra.layers.SqueezeExcite``) acts on the expanded features with a reduction to 1/4 of the
  block's input width, as in the authors' TPU code (the paper does not state the ratio).
- ``mnasnet_b1``: the search's other model (arXiv v1; tensorflow/tpu "mnasnet-b1"; torchvision
  ``mnasnet1_0``, timm ``mnasnet_100``): no SE, SepConv 16, MBConv3 3x3 24 x3, MBConv3 5x5 40 x3,
  MBConv6 5x5 80 x3, MBConv6 3x3 96 x2, MBConv6 5x5 192 x4, MBConv6 3x3 320 x1.
- Width multiplier (arch kwarg ``width_mult``): every width, the stem included, becomes
  ``make_divisible(c * width_mult, 8)``; the 1280-wide last conv is not scaled (torchvision's
  ``mnasnet0_5 .. 1_3``, registered as ``mnasnet_b1_0_5``, ``_0_75``, ``_1_3``).

Features: 16 (s2), 24 (s4), 40 (s8), 112 / 96 (s16), 320 (s32). The 1x1 conv to 1280 serves only
the classifier and lives in the head.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo
from ..layers import ConvBnAct, ConvClassifierHead, drop_path_rates, make_divisible
from ..layers.inverted_residual import InvertedResidual
from ..registry import register

_MNAS = dict(family="MnasNet", paper="MnasNet: Platform-Aware Neural Architecture Search for Mobile (CVPR 2019)",
             year=2018, arxiv="1807.11626")
# B1 is the network of the paper's arXiv v1, not of the CVPR version (whose models are A1-A3)
_MNAS_B1 = {**_MNAS, "paper": "MnasNet (arXiv v1 model / tensorflow/tpu 'mnasnet-b1')"}

# (expansion, kernel, channels, repeats, stride, se_ratio), grouped by the feature stride they end at
_ARCHS = {
    "a1": (((1, 3, 16, 1, 1, 0.0),),
           ((6, 3, 24, 2, 2, 0.0),),
           ((3, 5, 40, 3, 2, 0.25),),
           ((6, 3, 80, 4, 2, 0.0), (6, 3, 112, 2, 1, 0.25)),
           ((6, 5, 160, 3, 2, 0.25), (6, 3, 320, 1, 1, 0.0))),
    "b1": (((1, 3, 16, 1, 1, 0.0),),
           ((3, 3, 24, 3, 2, 0.0),),
           ((3, 5, 40, 3, 2, 0.0),),
           ((6, 5, 80, 3, 2, 0.0), (6, 3, 96, 2, 1, 0.0)),
           ((6, 5, 192, 4, 2, 0.0), (6, 3, 320, 1, 1, 0.0))),
}


class MnasNet(Backbone):
    def __init__(self, arch: str = "a1", width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.2, drop_path_rate: float = 0.0) -> None:
        super().__init__(in_chans, num_classes)
        if arch not in _ARCHS:
            raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
        cfg = _ARCHS[arch]
        ch = lambda c: make_divisible(c * width_mult, 8)  # noqa: E731
        in_ch = ch(32)
        self.stem = ConvBnAct(in_chans, in_ch, 3, 2)
        rates = iter(drop_path_rates(drop_path_rate, sum(r[3] for stage in cfg for r in stage)))
        for i, stage in enumerate(cfg):
            blocks = []
            for t, k, c, n, s, se in stage:
                for j in range(n):
                    blocks.append(InvertedResidual(in_ch, ch(c), s if j == 0 else 1, t, k, act=nn.ReLU, se_ratio=se,
                                                   drop_path=next(rates)))
                    in_ch = ch(c)
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
            self.stage_info.append(FeatureInfo(f"stage{i + 1}", in_ch, 2 ** (i + 1)))
        self.head = ConvClassifierHead(in_ch, 1280, num_classes, drop_rate, act=nn.ReLU)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="sigmoid")
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


@register("mnasnet_a1", **_MNAS, references=("timm:semnasnet_100",), arch="a1")
@register("mnasnet_b1", **_MNAS_B1, references=("timm:mnasnet_100",), arch="b1")
@register("mnasnet_b1_0_5", **_MNAS_B1, references=("torchvision:mnasnet0_5", "timm:mnasnet_050"), arch="b1",
          width_mult=0.5)
@register("mnasnet_b1_0_75", **_MNAS_B1, references=("torchvision:mnasnet0_75", "timm:mnasnet_075"), arch="b1",
          width_mult=0.75)
@register("mnasnet_b1_1_3", **_MNAS_B1, references=("torchvision:mnasnet1_3",), arch="b1", width_mult=1.3)
def mnasnet(**kw) -> MnasNet:
    return MnasNet(**kw)
