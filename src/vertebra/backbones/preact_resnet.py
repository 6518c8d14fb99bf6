"""Pre-activation ResNet: He, Zhang, Ren & Sun, "Identity Mappings in Deep Residual Networks"
(ECCV 2016, arXiv 1603.05027).

The residual unit is reordered so that the identity path stays clean: each unit is
BN -> ReLU -> conv (-> BN -> ReLU -> conv ...) added to its input, with no BN or ReLU after the
addition (Fig. 1(b), 4(e)). The units are vertebra.layers.preact's PreActBasic (two 3x3) and
PreActBottleneck (1x1, 3x3, 1x1 x4); where the shape changes the shortcut is a 1x1 convolution,
without BN, of the pre-activated input ("these projection shortcuts are also with
pre-activation").

The paper's treatment of the first and last units (Sec. 4.1) is followed exactly:

- the first unit follows a stand-alone convolution, so its activation sits right after that
  convolution, before the split into residual and shortcut paths: the stem is conv-BN-ReLU and
  the first unit has no BN-ReLU of its own (no double BN);
- the last unit is followed by an extra BN+ReLU before the pooling ("final BN+ReLU").

The same holds at every stage boundary: the first unit of a stage changes the shape, so its
pre-activation is shared by both paths. Here that BN is written once per stage, after it, as
``norm{i}`` (BN over the output of ``layer{i}``), followed by a ReLU, and the next stage's
first unit takes the activated tensor as is. This is exactly the paper's network (the
authors' resnet-pre-act.lua puts the same BN-ReLU at the head of the dimension-increasing
unit); it only moves the BN's name, and it gives each stage a normalised output.

ImageNet (``preact_resnet18`` ... ``preact_resnet200``): 7x7/2 conv 64 + BN + ReLU, 3x3/2
max-pool, four stages of basic (18, 34) or bottleneck units (50, 101, 152, 200 = [3, 24, 36, 3],
the paper's ResNet-200) at widths 64/128/256/512, final BN+ReLU, global pool, FC. The stride of
a downsampling bottleneck sits on its 3x3 convolution, as in fb.resnet.torch's preresnet.lua and
timm ``resnetv2``; ``stride_in_1x1=True`` moves it to the first 1x1 (same weights).

CIFAR (``preact_resnet164``, ``preact_resnet1001``, depth 9n+2 with n = 18 / 111): 3x3 conv 16
+ BN + ReLU, three stages of n bottleneck units of width 16/32/64 (outputs 64/128/256) at
32/16/8 pixels, final BN+ReLU, global pool, FC (the authors' resnet-1k-layers code). That code
strides the first 1x1 convolution of a downsampling unit (and its shortcut), so these presets
default to ``stride_in_1x1=True``. CIFAR networks keep full resolution in their first stage:
their features are at strides 1, 2, 4 and never reach stride 8.

Features (``stage_info``): ImageNet ``conv1`` (64, s2), ``layer1`` ... ``layer4`` (s4 ... s32);
CIFAR ``layer1`` ... ``layer3`` (s1, s2, s4). A pre-activation stage's raw output is the
un-normalised sum of residuals, so every stage output yielded here is taken after that stage's
BN+ReLU (``norm{i}`` + ReLU): for the last stage that is the network's final BN+ReLU; for the
others it is the pre-activation that the next stage's first unit applies anyway. The taps are
therefore normalised like a post-activation ResNet's, cost nothing extra (no parameter, no
second pass: the trunk continues from the yielded tensor, so each BN still sees one batch per
forward), and every parameter is used by the classifier too. timm's ``resnetv2`` instead taps
the raw stage sums and only normalises the last one.

``stem_pool_first=True`` (not the paper's; timm ``resnetv2``'s order): the stem's max-pool runs before its
BN-ReLU (the first pre-activation), so timm's ``resnetv2_50/101`` weights give timm's outputs exactly
(the two orders agree only while every BN scale is positive); the stride-2 tap is then the raw stem
convolution.

Stochastic depth: ``drop_path_rate`` drops unit l of L with rate * l / L (Huang et al.'s linear
rule); this is not part of the paper.

Shortcuts: the identity where the shape is unchanged, else a 1x1 projection without BN (option
B), as in the authors' code, timm and imgclsmob; fb.resnet.torch's preresnet.lua adds a BN to the
projection, which the paper does not describe. Parameter counts: 50/101/152 equal timm
``resnetv2_*`` exactly; 200 is 128 below imgclsmob ``preresnet200b``, which keeps a BN in the
first unit after the stem's (the double BN avoided here).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct, PreActBasic, PreActBottleneck, drop_path_rates
from ..registry import register

_PREACT = dict(family="Pre-Activation ResNet", paper="Identity Mappings in Deep Residual Networks (ECCV 2016)",
               year=2016, arxiv="1603.05027")

_UNITS = {"basic": PreActBasic, "bottleneck": PreActBottleneck}


def _unit(unit: type[nn.Module], in_ch: int, width: int, stride: int, drop_path: float, *,
          preactivated: bool, stride_in_1x1: bool) -> nn.Module:
    """A shared pre-activation unit, adjusted for where it sits in the network.

    ``preactivated``: the input already went through BN-ReLU (the stem's, or the previous
    stage's ``norm``), so the unit's own BN is dropped; its ReLU of a non-negative input is then
    the identity and both paths see the activated input, as the paper prescribes.
    ``stride_in_1x1``: a downsampling bottleneck strides its first 1x1 instead of its 3x3.
    """
    extra = {"stride_in_1x1": stride_in_1x1} if unit is PreActBottleneck else {}
    return unit(in_ch, width, stride, drop_path=drop_path, preact=not preactivated, **extra)


class PreActResNet(Backbone):
    """Pre-activation ResNet, ImageNet (7x7 stem, four stages) or CIFAR (3x3 stem, three stages).

    ``layers``: units per stage; ``widths``: the units' inner widths (bottleneck outputs are 4x).
    """

    def __init__(self, block: str, layers: list[int], widths: list[int] | None = None, *, cifar: bool = False,
                 num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                 stride_in_1x1: bool = False, stem_pool_first: bool = False):
        super().__init__(in_chans, num_classes)
        unit = _UNITS[block]
        widths = list(widths or ((16, 32, 64) if cifar else (64, 128, 256, 512)))
        if len(widths) != len(layers):
            raise ValueError(f"{len(layers)} stages need {len(layers)} widths, got {widths}")
        self.cifar = cifar
        self.stem_pool_first = stem_pool_first and not cifar
        if cifar:
            self.min_input_size = 8
            in_ch = widths[0]
            self.conv1 = ConvBnAct(in_chans, in_ch, 3, 1)
            self.maxpool = None
            stride0 = 1
        else:
            in_ch = 64
            self.conv1 = ConvBnAct(in_chans, in_ch, 7, 2, 3)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            if stem_pool_first:  # conv -> max-pool -> BN-ReLU (the BN is not folded across the pool)
                self.conv1 = nn.Sequential(OrderedDict(conv=self.conv1.conv, pool=self.maxpool, bn=self.conv1.bn,
                                                       act=self.conv1.act))
                self.maxpool = None
            self.stage_info = [FeatureInfo("conv1", in_ch, 2)]
            stride0 = 4
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        for i, (n, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            units = []
            for j in range(n):
                units.append(_unit(unit, in_ch, width, stride if j == 0 else 1, next(rates),
                                   preactivated=j == 0, stride_in_1x1=stride_in_1x1))
                in_ch = width * unit.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
            # BN over this stage's output: the next stage's shared pre-activation, or the
            # network's final BN after the last stage
            self.add_module(f"norm{i + 1}", nn.BatchNorm2d(in_ch))
            self.stage_info.append(FeatureInfo(f"layer{i + 1}", in_ch, stride0 * 2**i))
        self.num_stages = len(layers)
        self.act = nn.ReLU(inplace=True)
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        if self.stem_pool_first:
            x = self.conv1.conv(x)
            yield x  # the stride-2 tap: the stem convolution's raw output (its BN-ReLU runs after the pool)
            x = self.conv1.act(self.conv1.bn(self.conv1.pool(x)))
        else:
            x = self.conv1(x)
        if self.maxpool is not None:
            yield x
            x = self.maxpool(x)
        for i in range(1, self.num_stages + 1):
            # stage output + BN+ReLU: the next stage's pre-activation / the final BN+ReLU
            x = self.act(getattr(self, f"norm{i}")(getattr(self, f"layer{i}")(x)))
            yield x


@register("preact_resnet18", **_PREACT, block="basic", layers=(2, 2, 2, 2))
@register("preact_resnet34", **_PREACT, block="basic", layers=(3, 4, 6, 3))
@register("preact_resnet50", **_PREACT, block="bottleneck", layers=(3, 4, 6, 3))
@register("preact_resnet101", **_PREACT, block="bottleneck", layers=(3, 4, 23, 3))
@register("preact_resnet152", **_PREACT, block="bottleneck", layers=(3, 8, 36, 3))
@register("preact_resnet200", **_PREACT, block="bottleneck", layers=(3, 24, 36, 3))
def preact_resnet(*, block, layers, **kw) -> PreActResNet:
    return PreActResNet(block, list(layers), **kw)


def _cifar_layers(depth: int) -> list[int]:
    if (depth - 2) % 9:
        raise ValueError(f"a CIFAR pre-activation bottleneck ResNet has 9n+2 layers, got depth {depth}")
    return [(depth - 2) // 9] * 3


@register("preact_resnet164", **_PREACT, depth=164, stride_in_1x1=True)
@register("preact_resnet1001", **_PREACT, depth=1001, stride_in_1x1=True)
def preact_resnet_cifar(*, depth, num_classes=10, **kw) -> PreActResNet:
    return PreActResNet("bottleneck", _cifar_layers(depth), cifar=True, num_classes=num_classes, **kw)
