"""PolyNet: Zhang, Li, Loy & Lin, "PolyNet: A Pursuit of Structural Diversity in Very Deep
Networks" (CVPR 2017, arXiv 1611.05725).

PolyInception modules replace the residual unit ``I + F`` of Inception-ResNet by polynomial
compositions of Inception blocks (Sec. 3):

- **poly-2** ``I + F + F∘F`` and **poly-3** ``I + F + F∘F + F∘F∘F``: one Inception block F
  applied repeatedly, its convolutions shared between the orders;
- **2-way** ``I + F + G``: two Inception blocks in parallel (3-way: three);
- (mpoly-2/3, ``I + F + G∘F``..., are the unshared cascades; the best model does not use them).

The paper's best model, Very Deep PolyNet (Sec. 5, 18.71% top-1 / 4.25% top-5 single crop at
331x331), is built here with the stage repetition counts of its release:

- the Inception-v4 stem (Fig. 3 of 1602.07261) -> 35x35x384;
- stage A: 10 x 2-way Inception-ResNet-A (IR-v2 widths: 32 | 32->32 | 32->48->64, 1x1 to 384);
- Reduction-A (256, 256, 384, 384) -> 17x17x1152;
- stage B: 20 modules, poly-3 and 2-way alternating (10 each), Inception-ResNet-B blocks
  (192 | 128->1x7 160->7x1 192, 1x1 to 1152);
- Reduction-B (256->256->3x3/2 256 | 256->3x3/2 256 | 256->3x3/2 384 | pool) -> 8x8x2048;
- stage C: 10 modules, poly-3 and 2-way alternating (5 each), Inception-ResNet-C blocks
  (192 | 192->1x3 224->3x1 256, 1x1 to 2048);
- global average pool, dropout 0.2, linear.

As in the authors' released model, the 1x1 expansion of each block is a convolution + BN
without activation, each order of a poly-3 module has its own BatchNorm layers and its own
expansion convolution (only the Inception branches' convolutions are shared), each order's
output is ReLU-ed before it is fed to the next, and the residual scale of the 40 modules
decays linearly from 1.0 to 0.7 (Sec. 5's "residual scaling", needed to train it at all).
``drop_path_rate`` implements the paper's stochastic paths: every path of a module (each
order of a poly-3, each way of a 2-way) is dropped independently, the rate rising linearly
with depth. BatchNorm eps 1e-5. 95.37M parameters with 1000 classes.

Features at 331: stem conv (64, s2, 163), 160 (s4, 81), stage A (384, s8, 39), stage B
(1152, s16, 19), stage C (2048, s32, 9). The smallest input that runs is 75x75.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct, DropPath, conv_bn, drop_path_rates
from ..layers.inception import Concat, max_pool
from ..registry import register

_POLY = dict(family="PolyNet", paper="PolyNet: A Pursuit of Structural Diversity in Very Deep Networks (CVPR 2017)",
             year=2016, arxiv="1611.05725")


def _pad(k):
    return tuple(kk // 2 for kk in k) if isinstance(k, tuple) else k // 2


def _c(i: int, o: int, k=1, s: int = 1, p=None) -> ConvBnAct:
    return ConvBnAct(i, o, k, s, _pad(k) if p is None else p)


def _v(i: int, o: int, k=3, s: int = 1) -> ConvBnAct:
    return ConvBnAct(i, o, k, s, 0)


class SharedConvBnAct(nn.Module):
    """A convolution shared by the orders of a poly-N module, with one BatchNorm per order."""

    def __init__(self, in_ch: int, out_ch: int, k, orders: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, k, 1, _pad(k), bias=False)
        self.bns = nn.ModuleList([nn.BatchNorm2d(out_ch) for _ in range(orders)])
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, order: int) -> Tensor:
        return self.act(self.bns[order](self.conv(x)))


# (in, out, kernel) chains of each block's branches; the last entry: the concat width
_A = ([(384, 32, 1)], [(384, 32, 1), (32, 32, 3)], [(384, 32, 1), (32, 48, 3), (48, 64, 3)])
_B = ([(1152, 192, 1)], [(1152, 128, 1), (128, 160, (1, 7)), (160, 192, (7, 1))])
_C = ([(2048, 192, 1)], [(2048, 192, 1), (192, 224, (1, 3)), (224, 256, (3, 1))])


class InceptionResidual(nn.Module):
    """One Inception-ResNet block F: branches concatenated, then a linear 1x1 conv-BN expansion.

    With ``orders > 1`` (poly-N) the branch convolutions are shared and ``forward(x, k)``
    uses the BatchNorms and expansion of order ``k``.
    """

    def __init__(self, spec, orders: int = 1):
        super().__init__()
        ch = spec[0][0][0]
        cat = sum(path[-1][1] for path in spec)
        if orders == 1:
            self.paths = nn.ModuleList([nn.Sequential(*[_c(i, o, k) for i, o, k in path]) for path in spec])
        else:
            self.paths = nn.ModuleList([nn.ModuleList([SharedConvBnAct(i, o, k, orders) for i, o, k in path])
                                        for path in spec])
        self.up = nn.ModuleList([conv_bn(cat, ch, 1) for _ in range(orders)])

    def forward(self, x: Tensor, order: int = 0) -> Tensor:
        outs = []
        for path in self.paths:
            if isinstance(path, nn.Sequential):
                outs.append(path(x))
            else:
                y = x
                for layer in path:
                    y = layer(y, order)
                outs.append(y)
        return self.up[order](torch.cat(outs, 1))


class PolyModule(nn.Module):
    """poly-N: ``relu(x + s*F(x) + s*F(relu F(x)) + ...)``, F's convolutions shared."""

    def __init__(self, spec, order: int, scale: float, drop_path: float = 0.0):
        super().__init__()
        self.order, self.scale = order, scale
        self.block = InceptionResidual(spec, order)
        self.drop_paths = nn.ModuleList([DropPath(drop_path) for _ in range(order)])
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out, y = x, x
        for k in range(self.order):
            y = self.block(y, k)
            out = out + self.drop_paths[k](y * self.scale)
            y = self.act(y)
        return self.act(out)

    def extra_repr(self) -> str:
        return f"poly-{self.order}, scale={self.scale:.6f}"


class MultiWayModule(nn.Module):
    """N-way: ``relu(x + s*F(x) + s*G(x) + ...)``, independent blocks."""

    def __init__(self, spec, ways: int, scale: float, drop_path: float = 0.0):
        super().__init__()
        self.scale = scale
        self.blocks = nn.ModuleList([InceptionResidual(spec) for _ in range(ways)])
        self.drop_paths = nn.ModuleList([DropPath(drop_path) for _ in range(ways)])
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for block, dp in zip(self.blocks, self.drop_paths):
            out = out + dp(block(x) * self.scale)
        return self.act(out)

    def extra_repr(self) -> str:
        return f"{len(self.blocks)}-way, scale={self.scale:.6f}"


class PolyNet(Backbone):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, n_a: int = 10,
                 n_b: int = 20, n_c: int = 10, poly_order: int = 3, ways: int = 2, scale_last: float = 0.7,
                 drop_rate: float = 0.2, drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes)
        self.min_input_size = 75
        n = n_a + n_b + n_c
        scales = iter([1.0 - (1.0 - scale_last) * i / max(n - 1, 1) for i in range(n)])
        rates = iter(drop_path_rates(drop_path_rate, n))
        # stem (Inception-v4 Fig. 3)
        self.stem = nn.Sequential(_v(in_chans, 32, 3, 2), _v(32, 32), _c(32, 64, 3))
        self.stem_s4 = Concat(max_pool(), _v(64, 96, 3, 2))
        self.stem_rest = nn.Sequential(
            Concat(nn.Sequential(_c(160, 64, 1), _v(64, 96)),
                   nn.Sequential(_c(160, 64, 1), _c(64, 64, (7, 1)), _c(64, 64, (1, 7)), _v(64, 96))),
            Concat(_v(192, 192, 3, 2), max_pool()),
        )
        self.stage_a = nn.Sequential(*[MultiWayModule(_A, ways, next(scales), next(rates)) for _ in range(n_a)])
        self.reduction_a = Concat(_v(384, 384, 3, 2), nn.Sequential(_c(384, 256, 1), _c(256, 256, 3),
                                                                    _v(256, 384, 3, 2)), max_pool())

        def mixed(spec, count):  # poly-N and N-way alternating, poly first
            return nn.Sequential(*[
                PolyModule(spec, poly_order, next(scales), next(rates)) if i % 2 == 0
                else MultiWayModule(spec, ways, next(scales), next(rates)) for i in range(count)])

        self.stage_b = mixed(_B, n_b)
        self.reduction_b = Concat(
            nn.Sequential(_c(1152, 256, 1), _c(256, 256, 3), _v(256, 256, 3, 2)),
            nn.Sequential(_c(1152, 256, 1), _v(256, 256, 3, 2)),
            nn.Sequential(_c(1152, 256, 1), _v(256, 384, 3, 2)),
            max_pool(),
        )
        self.stage_c = mixed(_C, n_c)
        self.stage_info = [FeatureInfo("stem", 64, 2), FeatureInfo("stem_s4", 160, 4),
                             FeatureInfo("stage_a", 384, 8), FeatureInfo("stage_b", 1152, 16),
                             FeatureInfo("stage_c", 2048, 32)]
        self.head = ClassifierHead(2048, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.stem(x)
        yield x
        x = self.stem_s4(x)
        yield x
        x = self.stage_a(self.stem_rest(x))
        yield x
        x = self.stage_b(self.reduction_a(x))
        yield x
        yield self.stage_c(self.reduction_b(x))


@register("polynet", **_POLY)
def polynet(**kw) -> PolyNet:
    return PolyNet(**kw)
