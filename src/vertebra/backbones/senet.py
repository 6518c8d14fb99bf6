"""SENet: Hu, Shen, Albanie, Sun & Wu, "Squeeze-and-Excitation Networks" (CVPR 2018; TPAMI 2019,
arXiv 1709.01507).

An SE block (global average pool -> FC C/16 -> ReLU -> FC C -> sigmoid, reduction r = 16)
rescales the channels of every residual branch before it is added to the identity (Fig. 3).

- SE-ResNet-50/101/152 and SE-ResNeXt-50/101 (32x4d) (Table 1): the ResNet/ResNeXt layouts
  with an SE block in every bottleneck. These follow the released Caffe models (and their
  ports, Cadene's ``se_resnet*`` and timm's ``legacy_seresnet*``): the stem's max-pool is a
  3x3/2 *ceil-mode* pool without padding, and in a downsampling SE-ResNet bottleneck the
  stride sits on the first 1x1 convolution (SE-ResNeXt puts it on the grouped 3x3).
- SENet-154 (Sec. 6 / appendix): SE-ResNeXt-152 (64x4d) with the paper's changes: the first
  1x1 of each bottleneck has half the channels of the 3x3 (2 x planes, 3x3 of 4 x planes in
  64 groups), the 7x7 stem becomes three 3x3 convolutions (64, 64, 128 channels), the
  downsampling projections are 3x3/2 convolutions, and dropout 0.2 before the classifier.

Features: ``stem`` (s2), ``layer1``..``layer4`` (s4..s32).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct, DropPath, SqueezeExcite, conv_bn, drop_path_rates
from ..registry import register

_SENET = dict(family="SENet", paper="Squeeze-and-Excitation Networks (CVPR 2018; TPAMI 2019)", year=2017,
              arxiv="1709.01507")


class SEBottleneck(nn.Module):
    """1x1 -> 3x3 (grouped) -> 1x1, SE on the branch, added to the (projected) identity, ReLU.

    ``width1``/``width2`` are the widths of the first 1x1 and of the 3x3; the stride sits on the
    first 1x1 when ``stride_in_1x1`` (SE-ResNet, Caffe layout) and on the 3x3 otherwise.
    """

    def __init__(self, in_ch: int, width1: int, width2: int, out_ch: int, stride: int = 1, groups: int = 1,
                 reduction: int = 16, stride_in_1x1: bool = False, downsample: nn.Module | None = None,
                 drop_path: float = 0.0):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvBnAct(in_ch, width1, 1, s1)
        self.conv2 = ConvBnAct(width1, width2, 3, s3, groups=groups)
        self.conv3 = conv_bn(width2, out_ch, 1)
        self.se = SqueezeExcite(out_ch, reduction)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.se(self.conv3(self.conv2(self.conv1(x))))
        return self.act(self.drop_path(out) + shortcut)


class SENet(Backbone):
    """SE-ResNet (``kind="resnet"``), SE-ResNeXt (``"resnext"``) and SENet-154 (``"senet154"``)."""

    def __init__(self, layers: tuple[int, ...], kind: str = "resnet", groups: int = 1, base_width: int = 4,
                 reduction: int = 16, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes)
        if kind not in ("resnet", "resnext", "senet154"):
            raise ValueError(f"kind must be 'resnet', 'resnext' or 'senet154', got {kind!r}")
        if kind == "senet154":
            stem_ch = 128
            self.stem = nn.Sequential(
                ConvBnAct(in_chans, 64, 3, 2),
                ConvBnAct(64, 64, 3, 1),
                ConvBnAct(64, stem_ch, 3, 1),
            )
        else:
            stem_ch = 64
            self.stem = ConvBnAct(in_chans, stem_ch, 7, 2, 3)
        # the Caffe models pool with ceil_mode and no padding
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.stage_info = [FeatureInfo("stem", stem_ch, 2)]
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        in_ch = stem_ch
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            out_ch = planes * 4
            if kind == "resnet":
                w1 = w2 = planes
            elif kind == "resnext":
                w1 = w2 = math.floor(planes * base_width / 64) * groups
            else:
                w1, w2 = planes * 2, planes * 4
            blocks = []
            for j in range(n):
                downsample = None
                if j == 0 and (stride != 1 or in_ch != out_ch):
                    k = 3 if (kind == "senet154" and i > 0) else 1
                    downsample = conv_bn(in_ch, out_ch, k, stride)
                blocks.append(SEBottleneck(in_ch, w1, w2, out_ch, stride if j == 0 else 1, groups, reduction,
                                           stride_in_1x1=(kind == "resnet"), downsample=downsample,
                                           drop_path=next(rates)))
                in_ch = out_ch
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_info.append(FeatureInfo(f"layer{i + 1}", out_ch, 4 * 2**i))
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.stem(x)
        yield x
        x = self.layer1(self.pool(x))
        yield x
        x = self.layer2(x)
        yield x
        x = self.layer3(x)
        yield x
        yield self.layer4(x)


@register("se_resnet50", **_SENET, layers=(3, 4, 6, 3), kind="resnet")
@register("se_resnet101", **_SENET, layers=(3, 4, 23, 3), kind="resnet")
@register("se_resnet152", **_SENET, layers=(3, 8, 36, 3), kind="resnet")
@register("se_resnext50_32x4d", **_SENET, layers=(3, 4, 6, 3), kind="resnext", groups=32, base_width=4)
@register("se_resnext101_32x4d", **_SENET, layers=(3, 4, 23, 3), kind="resnext", groups=32, base_width=4)
@register("senet154", **_SENET, layers=(3, 8, 36, 3), kind="senet154", groups=64, drop_rate=0.2)
def senet(**kw) -> SENet:
    return SENet(**kw)
