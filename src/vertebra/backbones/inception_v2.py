"""BN-Inception and Inception-v2: two different networks that both get called "Inception v2".

- ``bn_inception``: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
  Reducing Internal Covariate Shift" (ICML 2015, arXiv 1502.03167), the network of its Sec. 4.2
  and appendix Fig. 5. It is GoogLeNet with BatchNorm after every convolution and four changes:
  each 5x5 convolution becomes two stacked 3x3 (the "double 3x3" branch, more depth for ~the
  same cost); the 28x28 stage gets a third module (3a, 3b, 3c); the max-pools between stages
  are replaced by stride-2 modules (3c, 4e) whose pool branch is a max-pool passed through
  without projection; the pool branches mix average and max pooling. The first layer is the
  paper's 7x7/2 separable convolution with depth multiplier 8 (depthwise, then 1x1 to 64, then
  BN-ReLU). No dropout, no auxiliary classifiers. 11.28M parameters (Cadene's Caffe port,
  11.295M, uses a full 7x7 first convolution and conv biases). TF-slim names this network
  "inception_v2".
- ``inception_v2``: Szegedy et al., "Rethinking the Inception Architecture for Computer Vision"
  (CVPR 2016, arXiv 1512.00567), its Table 1 network (23.4% top-1, Table 3). It keeps the
  factorisation idea but redesigns the whole net: the 7x7 stem becomes three 3x3 convolutions,
  the 35x35 modules factorise the 5x5 into 3x3s (Fig. 5), the 17x17 modules use n x 1 / 1 x n
  factorisation with n = 7 (Fig. 6), the 8x8 modules expand their outputs (Fig. 7) and the
  grid is reduced by the parallel stride-2 conv / pool blocks of Fig. 10 instead of a pool.
  As Table 1 lists it: conv 3x3/2 32, conv 3x3 32, conv 3x3 64 padded, pool 3x3/2, conv 3x3
  80, conv 3x3/2 192, conv 3x3 288 padded (35x35x288), 3 x Fig. 5, reduction, 5 x Fig. 6
  (17x17x768), reduction, 2 x Fig. 7 (8x8x2048), pool, linear. The paper gives no widths
  inside the modules: they are the released Inception-v3's (inception_v3.py), which this net
  shares blocks with; the paper gives no parameter count either (ours: 25.95M, 6.35 GMACs at
  299, against the paper's "about 2.5 times" GoogLeNet's cost - the open widths make it heavier
  than the authors' net, whose widths were never published).

Both exist because the names collide: BN-Inception is the 2015 BatchNorm paper's ImageNet
model (and TF-slim's "v2" checkpoint); Inception-v2 is the Rethinking paper's intermediate
design on the way to Inception-v3 (which adds RMSProp, label smoothing and the BN-auxiliary
head to it, and is released with a slightly different stem and 4 instead of 5 17x17 modules).

Features: bn_inception conv1 (64, s2), conv3 (192, s4), inception3b (320, s8),
inception4d (608, s16), inception5b (1024, s32); inception_v2 at 299: conv 64 (s2, 147),
conv 80 (s4, 71), 35x35x288 (s8), 17x17x768 (s16), 8x8x2048 (s32).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct
from ..layers.inception import Concat, cbr, inception_a, inception_b, inception_c, max_pool, reduction_17, reduction_35
from ..registry import register

_BN = dict(family="Inception", year=2015, arxiv="1502.03167",
           paper="Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift "
                 "(ICML 2015)")
_RETHINK = dict(family="Inception", paper="Rethinking the Inception Architecture for Computer Vision (CVPR 2016)",
                year=2015, arxiv="1512.00567")

# BN paper Fig. 5: (#1x1, #3x3 reduce, #3x3, #double 3x3 reduce, #double 3x3, pool, pool proj, stride)
_BN_CFG = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 1),
    "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 1),
    "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "4c": (160, 128, 160, 128, 160, "avg", 128, 1),
    "4d": (96, 128, 192, 160, 192, "avg", 128, 1),
    "4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1),
    "5b": (352, 192, 320, 192, 224, "max", 128, 1),
}


def _bn_conv(i: int, o: int, k: int = 1, s: int = 1) -> ConvBnAct:
    return ConvBnAct(i, o, k, s)  # "same" padding, BN eps 1e-5 (the paper's Caffe/TF default)


def bn_inception_module(in_ch: int, cfg) -> tuple[Concat, int]:
    c1, r3, c3, rd, cd, pool, pp, s = cfg
    branches: list[nn.Module] = []
    if c1:
        branches.append(_bn_conv(in_ch, c1, 1))
    branches.append(nn.Sequential(_bn_conv(in_ch, r3, 1), _bn_conv(r3, c3, 3, s)))
    branches.append(nn.Sequential(_bn_conv(in_ch, rd, 1), _bn_conv(rd, cd, 3), _bn_conv(cd, cd, 3, s)))
    if s == 2:  # max-pool pass-through (ceil rounding keeps the sizes of the stride-2 convs)
        branches.append(nn.MaxPool2d(3, 2, ceil_mode=True))
        out = c3 + cd + in_ch
    else:
        p = nn.AvgPool2d(3, 1, 1) if pool == "avg" else nn.MaxPool2d(3, 1, 1)
        branches.append(nn.Sequential(p, _bn_conv(in_ch, pp, 1)))
        out = c1 + c3 + cd + pp
    return Concat(*branches), out


class BNInception(Backbone):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 separable_stem: bool = True):
        super().__init__(in_chans, num_classes)
        if separable_stem:  # 7x7/2 depthwise (multiplier 8) -> 1x1 -> BN -> ReLU
            self.conv1 = nn.Sequential(nn.Conv2d(in_chans, in_chans * 8, 7, 2, 3, groups=in_chans, bias=False),
                                       ConvBnAct(in_chans * 8, 64, 1))
        else:
            self.conv1 = _bn_conv(in_chans, 64, 7, 2)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = _bn_conv(64, 64, 1)
        self.conv3 = _bn_conv(64, 192, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        in_ch = 192
        chans = {}
        for name, cfg in _BN_CFG.items():
            mod, in_ch = bn_inception_module(in_ch, cfg)
            self.add_module(f"inception{name}", mod)
            chans[name] = in_ch
        self.stage_info = [FeatureInfo("conv1", 64, 2), FeatureInfo("conv3", 192, 4),
                             FeatureInfo("inception3b", chans["3b"], 8), FeatureInfo("inception4d", chans["4d"], 16),
                             FeatureInfo("inception5b", chans["5b"], 32)]
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.conv1(x)
        yield x
        x = self.conv3(self.conv2(self.pool1(x)))
        yield x
        x = self.inception3b(self.inception3a(self.pool2(x)))
        yield x
        x = self.inception3c(x)
        x = self.inception4d(self.inception4c(self.inception4b(self.inception4a(x))))
        yield x
        yield self.inception5b(self.inception5a(self.inception4e(x)))


@register("bn_inception", **_BN, supports_drop_path=False)
def bn_inception(**kw) -> BNInception:
    return BNInception(**kw)


class InceptionV2(Backbone):
    """The Rethinking paper's Table 1 network."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.5):
        super().__init__(in_chans, num_classes)
        self.min_input_size = 75
        self.conv1 = cbr(in_chans, 32, 3, 2)     # 149
        self.conv2 = cbr(32, 32, 3)              # 147
        self.conv3 = cbr(32, 64, 3, p=1)         # 147
        self.pool1 = max_pool()                  # 73
        self.conv4 = cbr(64, 80, 3)              # 71
        self.conv5 = cbr(80, 192, 3, 2)          # 35
        self.conv6 = cbr(192, 288, 3, p=1)       # 35
        self.mixed_35 = nn.Sequential(*[inception_a(288, 64, k5=3) for _ in range(3)])
        self.reduce_35 = reduction_35(288)       # 17x17x768
        self.mixed_17 = nn.Sequential(*[inception_b(768, c7) for c7 in (128, 160, 160, 160, 192)])
        self.reduce_17 = reduction_17(768)       # 8x8x1280
        self.mixed_8 = nn.Sequential(inception_c(1280), inception_c(2048))
        self.stage_info = [FeatureInfo("conv3", 64, 2), FeatureInfo("conv4", 80, 4), FeatureInfo("mixed_35", 288, 8),
                             FeatureInfo("mixed_17", 768, 16), FeatureInfo("mixed_8", 2048, 32)]
        self.head = ClassifierHead(2048, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.conv3(self.conv2(self.conv1(x)))
        yield x
        x = self.conv4(self.pool1(x))
        yield x
        x = self.mixed_35(self.conv6(self.conv5(x)))
        yield x
        x = self.mixed_17(self.reduce_35(x))
        yield x
        yield self.mixed_8(self.reduce_17(x))


@register("inception_v2", **_RETHINK, supports_drop_path=False)
def inception_v2(**kw) -> InceptionV2:
    return InceptionV2(**kw)
