"""MobileNet (v1).

Howard, Zhu, Chen, Kalenichenko, Wang, Weyand, Andreetto, Adam, "MobileNets: Efficient
Convolutional Neural Networks for Mobile Vision Applications" (arXiv 1704.04861, 2017).

Table 1: a full 3x3/2 convolution with 32 filters, then 13 depthwise separable convolutions
(3x3 depthwise -> BN -> ReLU -> 1x1 pointwise -> BN -> ReLU, Fig. 3), downsampling by a
stride-2 depthwise convolution at the 2nd, 4th, 6th and 12th; average pool and a fully
connected classifier. Table 1 marks the 13th depthwise convolution "s2" but keeps the map at
7x7: it has stride 1 here, as in every released model. 4.2M parameters, 569M mult-adds.

- Width multiplier alpha (Sec. 3.3), arch kwarg ``width_mult`` (0.25, 0.5, 0.75, 1.0; any value
  works): every layer's channels become ``int(alpha * c)``; the paper's four values give integer
  widths. ``mobilenet_v1`` is 1.0; ``mobilenet_v1_0_75``, ``_0_5``, ``_0_25`` are registered.
- Resolution multiplier rho (Sec. 3.4) is the input size: 224, 192, 160, 128 all run (the net
  has global average pooling).
- Activation: the paper says ReLU (Fig. 3), the default. The released TF-slim checkpoints (and
  timm ``mobilenetv1_100``, its twin) use ReLU6: ``act="relu6"`` builds that network, which is
  what loads timm weights with equal outputs.

Features: 64 (s2, after the first separable conv), 128 (s4), 256 (s8), 512 (s16), 1024 (s32).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct
from ..registry import register

_MBV1 = dict(family="MobileNet",
             paper="MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications (arXiv)",
             year=2017, arxiv="1704.04861", supports_drop_path=False)

_ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6}

# (output channels, stride) of the 13 depthwise separable layers, grouped by feature stride
_STAGES = (((64, 1),), ((128, 2), (128, 1)), ((256, 2), (256, 1)),
           ((512, 2),) + ((512, 1),) * 5, ((1024, 2), (1024, 1)))


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise -> BN -> act -> 1x1 pointwise -> BN -> act (children ``conv_dw``, ``conv_pw``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv_dw = ConvBnAct(in_ch, in_ch, 3, stride, groups=in_ch, act=act)
        self.conv_pw = ConvBnAct(in_ch, out_ch, 1, act=act)


class MobileNetV1(Backbone):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3, act: str = "relu",
                 drop_rate: float = 0.0) -> None:
        super().__init__(in_chans, num_classes)
        if act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        act_layer = _ACTS[act]
        ch = lambda c: max(1, int(c * width_mult))  # noqa: E731
        in_ch = ch(32)
        self.stem = ConvBnAct(in_chans, in_ch, 3, 2, act=act_layer)
        for i, layers in enumerate(_STAGES):
            blocks = []
            for c, s in layers:
                blocks.append(DepthwiseSeparable(in_ch, ch(c), s, act_layer))
                in_ch = ch(c)
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
            self.stage_info.append(FeatureInfo(f"stage{i + 1}", in_ch, 2 ** (i + 1)))
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)

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


@register("mobilenet_v1", **_MBV1, width_mult=1.0)
@register("mobilenet_v1_0_75", **_MBV1, width_mult=0.75)
@register("mobilenet_v1_0_5", **_MBV1, width_mult=0.5)
@register("mobilenet_v1_0_25", **_MBV1, width_mult=0.25)
def mobilenet_v1(**kw) -> MobileNetV1:
    return MobileNetV1(**kw)
