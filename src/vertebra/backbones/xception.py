"""Xception: Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions"
(CVPR 2017, arXiv 1610.02357).

Fig. 5: 36 convolutional layers in 14 modules, every module but the first and the last with a
linear residual connection, every convolution followed by BatchNorm (not drawn).

- Entry flow: conv 3x3/2 32, conv 3x3 64 (both unpadded, 299 -> 149 -> 147, BN-ReLU), then three
  blocks of [SepConv, ReLU, SepConv, max-pool 3x3/2] with 128, 256 and 728 channels, each with a
  1x1/2 convolution (+BN) shortcut; the second and third start with a ReLU (the first follows
  the stem's ReLU already).
- Middle flow: 8 x [ReLU, SepConv 728] x 3 with identity shortcuts (19x19x728).
- Exit flow: [ReLU, SepConv 728, ReLU, SepConv 1024, max-pool 3x3/2] with a 1x1/2 shortcut,
  then SepConv 1536 + ReLU, SepConv 2048 + ReLU, global average pooling, (optional FC layers,
  not used here), dropout 0.5 (Sec. 4.3, ImageNet), logistic regression.

A separable convolution is a depthwise 3x3 followed by a pointwise 1x1 with no non-linearity
between them (Sec. 4.7: an intermediate ReLU hurts), then BN. 22,855,952 parameters with 1000
classes, Table 3's figure exactly. ``drop_path_rate`` drops the residual branch of the 12
residual blocks (stochastic depth; not in the paper, off by default). Weights load from timm's
``legacy_xception`` (Cadene's port of the Keras model).

Features at 299: conv2 (64, s2, 147), block1 (128, s4, 74), block2 (256, s8, 37), the middle
flow (728, s16, 19), conv4 (2048, s32, 10).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct, DropPath, conv_bn, drop_path_rates
from ..registry import register

_XCEPTION = dict(family="Xception", paper="Xception: Deep Learning with Depthwise Separable Convolutions (CVPR 2017)",
                 year=2016, arxiv="1610.02357")


class SeparableConvBn(nn.Sequential):
    """depthwise 3x3 -> pointwise 1x1 -> BN (no activation in between)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.dw = nn.Conv2d(in_ch, in_ch, 3, 1, 1, groups=in_ch, bias=False)
        self.pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)


class XceptionBlock(nn.Module):
    """``reps`` x [ReLU, SepConv] (+ max-pool 3x3/2 when strided) + shortcut (identity or 1x1/2 conv-BN).

    The widening SepConv comes first, except in the exit block (``grow_last``, 728 -> 728 -> 1024).
    """

    def __init__(self, in_ch: int, out_ch: int, reps: int, stride: int = 1, start_relu: bool = True,
                 grow_last: bool = False, drop_path: float = 0.0):
        super().__init__()
        # registered before the residual branch (the order of the timm/Cadene state_dict)
        self.skip = conv_bn(in_ch, out_ch, 1, stride) if (stride != 1 or in_ch != out_ch) else None
        widths = [in_ch] * (reps - 1) + [out_ch] if grow_last else [out_ch] * reps
        layers: list[nn.Module] = []
        ch = in_ch
        for i, w in enumerate(widths):
            if i > 0 or start_relu:
                # the block's first ReLU must not overwrite its input: the shortcut reads it
                layers.append(nn.ReLU(inplace=i > 0))
            layers.append(SeparableConvBn(ch, w))
            ch = w
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*layers)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        return self.drop_path(self.rep(x)) + shortcut


class Xception(Backbone):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, middle_blocks: int = 8, drop_rate: float = 0.5,
                 drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes)
        rates = iter(drop_path_rates(drop_path_rate, middle_blocks + 4))
        self.conv1 = ConvBnAct(in_chans, 32, 3, 2, 0)
        self.conv2 = ConvBnAct(32, 64, 3, 1, 0)
        self.block1 = XceptionBlock(64, 128, 2, 2, start_relu=False, drop_path=next(rates))
        self.block2 = XceptionBlock(128, 256, 2, 2, drop_path=next(rates))
        self.block3 = XceptionBlock(256, 728, 2, 2, drop_path=next(rates))
        self.middle = nn.Sequential(*[XceptionBlock(728, 728, 3, drop_path=next(rates)) for _ in range(middle_blocks)])
        self.block_exit = XceptionBlock(728, 1024, 2, 2, grow_last=True, drop_path=next(rates))
        self.conv3 = nn.Sequential(SeparableConvBn(1024, 1536), nn.ReLU(inplace=True))
        self.conv4 = nn.Sequential(SeparableConvBn(1536, 2048), nn.ReLU(inplace=True))
        self.stage_info = [FeatureInfo("conv2", 64, 2), FeatureInfo("block1", 128, 4), FeatureInfo("block2", 256, 8),
                             FeatureInfo("middle", 728, 16), FeatureInfo("conv4", 2048, 32)]
        self.head = ClassifierHead(2048, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.conv2(self.conv1(x))
        yield x
        x = self.block1(x)
        yield x
        x = self.block2(x)
        yield x
        x = self.middle(self.block3(x))
        yield x
        yield self.conv4(self.conv3(self.block_exit(x)))


@register("xception", **_XCEPTION)
def xception(**kw) -> Xception:
    return Xception(**kw)
