"""Inception-v4 and Inception-ResNet-v1/-v2: Szegedy, Ioffe, Vanhoucke & Alemi, "Inception-v4,
Inception-ResNet and the Impact of Residual Connections on Learning" (AAAI 2017, arXiv 1602.07261).

- ``inception_v4`` (Fig. 9): the stem of Fig. 3 (VALID convolutions except where marked, two
  concatenating splits, 35x35x384), 4 x Inception-A (Fig. 4), Reduction-A (Fig. 7 with
  k, l, m, n = 192, 224, 256, 384) to 17x17x1024, 7 x Inception-B (Fig. 5), Reduction-B (Fig. 8)
  to 8x8x1536, 3 x Inception-C (Fig. 6), average pool, dropout (keep 0.8), linear. The
  factorised convolutions follow the released TF-slim graph (timm's twin): Fig. 3's 7x1, 1x7
  pair is 1x7 then 7x1, and Inception-C's 1x3 (448), 3x1 (512) pair is 3x1 then 1x3 - the same
  parameters, another order. Pool-projection branches average without counting padding.
- ``inception_resnet_v1`` (Fig. 15): the lighter stem of Fig. 14 (-> 35x35x256), 5 x IR-A
  (Fig. 10), Reduction-A (192, 192, 256, 384) -> 17x17x896, 10 x IR-B (Fig. 11), Reduction-B
  (Fig. 12) -> 8x8x1792, 5 x IR-C (Fig. 13), average pool, dropout, linear.
- ``inception_resnet_v2``: the network released with the paper (TF-slim, timm, Cadene), which
  differs from the paper's Fig. 15 description: the stem is Inception-v3's followed by a
  Mixed_5b Inception module (35x35x320), 10 x block35, Reduction-A (256, 256, 384, 384) ->
  17x17x1088, 20 x block17, Reduction-B -> 8x8x2080, 9 x block8 plus a last block8 without
  ReLU (scale 1), a 1x1 convolution to 1536, pool, dropout, linear. The paper's own layout
  (Inception-v4 stem, 5/10/5 blocks, 1152/2144 channels) builds with ``layout="paper"``.

Residual blocks: the branches are concatenated, a linear 1x1 convolution (with bias, no BN:
"BN only on top of the traditional layers") restores the width, the result is **scaled**
(Sec. 3.3: 0.1-0.3 against instabilities with many filters; the released values 0.17 for the
35x35 blocks, 0.10 for 17x17 and 0.20 for 8x8 are used for both Inception-ResNets), added to
the input, and a ReLU follows. ``drop_path_rate`` drops the scaled branch (stochastic depth,
linear rule over all residual blocks). BatchNorm eps 1e-3.

Features at 299 (VALID padding makes the sizes odd; nothing is cropped):
v4 64 (s2, 147), 160 (s4, 73), 384 (s8, 35), 1024 (s16, 17), 1536 (s32, 8);
IR-v1 64, 192 (s4, 71), 256, 896, 1792; IR-v2 64, 192, 320, 1088, 1536 (after the 1x1 conv).
The smallest input that runs is 75x75.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, DropPath, drop_path_rates
from ..layers.inception import Concat, avg_pool, cbr, max_pool
from ..registry import register

_V4 = dict(family="Inception", year=2016, arxiv="1602.07261",
           paper="Inception-v4, Inception-ResNet and the Impact of Residual Connections on Learning (AAAI 2017)")


def _c(i: int, o: int, k, p=None, s: int = 1):
    """conv-BN-ReLU; ``p=None`` pads "SAME" for stride 1 (``(1, 7)`` -> ``(0, 3)``)."""
    if p is None:
        p = tuple(kk // 2 for kk in k) if isinstance(k, tuple) else (k // 2 if s == 1 else 0)
    return cbr(i, o, k, s, p)


def _v(i: int, o: int, k, s: int = 1):
    """A VALID convolution (the papers' "V")."""
    return cbr(i, o, k, s, 0)


def _pool_proj(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(avg_pool(count_include_pad=False), cbr(in_ch, out_ch, 1))


def v4_stem(in_chans: int) -> tuple[nn.Sequential, Concat, nn.Sequential]:
    """Fig. 3, split where the s2 and s4 features are taken."""
    s2 = nn.Sequential(_v(in_chans, 32, 3, 2), _v(32, 32, 3), _c(32, 64, 3))
    s4 = Concat(max_pool(), _v(64, 96, 3, 2))  # 73x73x160
    rest = nn.Sequential(
        Concat(nn.Sequential(_c(160, 64, 1), _v(64, 96, 3)),
               nn.Sequential(_c(160, 64, 1), _c(64, 64, (1, 7)), _c(64, 64, (7, 1)), _v(64, 96, 3))),  # 71x71x192
        Concat(_v(192, 192, 3, 2), max_pool()),  # 35x35x384
    )
    return s2, s4, rest


def inception_a(in_ch: int = 384) -> Concat:
    return Concat(_c(in_ch, 96, 1), nn.Sequential(_c(in_ch, 64, 1), _c(64, 96, 3)),
                  nn.Sequential(_c(in_ch, 64, 1), _c(64, 96, 3), _c(96, 96, 3)), _pool_proj(in_ch, 96))


def reduction_a(in_ch: int, k: int, l: int, m: int, n: int) -> Concat:  # noqa: E741 (the paper's names)
    """Fig. 7: out = n + m + in_ch."""
    return Concat(_v(in_ch, n, 3, 2), nn.Sequential(_c(in_ch, k, 1), _c(k, l, 3), _v(l, m, 3, 2)), max_pool())


def inception_b(in_ch: int = 1024) -> Concat:
    return Concat(
        _c(in_ch, 384, 1),
        nn.Sequential(_c(in_ch, 192, 1), _c(192, 224, (1, 7)), _c(224, 256, (7, 1))),
        nn.Sequential(_c(in_ch, 192, 1), _c(192, 192, (7, 1)), _c(192, 224, (1, 7)), _c(224, 224, (7, 1)),
                      _c(224, 256, (1, 7))),
        _pool_proj(in_ch, 128),
    )


def reduction_b_v4(in_ch: int = 1024) -> Concat:
    """Fig. 8: 192 + 320 + in_ch."""
    return Concat(nn.Sequential(_c(in_ch, 192, 1), _v(192, 192, 3, 2)),
                  nn.Sequential(_c(in_ch, 256, 1), _c(256, 256, (1, 7)), _c(256, 320, (7, 1)), _v(320, 320, 3, 2)),
                  max_pool())


def inception_c(in_ch: int = 1536) -> Concat:
    return Concat(
        _c(in_ch, 256, 1),
        nn.Sequential(_c(in_ch, 384, 1), Concat(_c(384, 256, (1, 3)), _c(384, 256, (3, 1)))),
        nn.Sequential(_c(in_ch, 384, 1), _c(384, 448, (3, 1)), _c(448, 512, (1, 3)),
                      Concat(_c(512, 256, (1, 3)), _c(512, 256, (3, 1)))),
        _pool_proj(in_ch, 256),
    )


class InceptionV4(Backbone):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2):
        super().__init__(in_chans, num_classes)
        self.min_input_size = 75
        self.stem, self.mixed_3a, self.stem_rest = v4_stem(in_chans)
        self.blocks_a = nn.Sequential(*[inception_a() for _ in range(4)])
        self.reduction_a = reduction_a(384, 192, 224, 256, 384)
        self.blocks_b = nn.Sequential(*[inception_b() for _ in range(7)])
        self.reduction_b = reduction_b_v4()
        self.blocks_c = nn.Sequential(*[inception_c() for _ in range(3)])
        self.stage_info = [FeatureInfo("stem", 64, 2), FeatureInfo("mixed_3a", 160, 4),
                             FeatureInfo("blocks_a", 384, 8), FeatureInfo("blocks_b", 1024, 16),
                             FeatureInfo("blocks_c", 1536, 32)]
        self.head = ClassifierHead(1536, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.stem(x)
        yield x
        x = self.mixed_3a(x)
        yield x
        x = self.blocks_a(self.stem_rest(x))
        yield x
        x = self.blocks_b(self.reduction_a(x))
        yield x
        yield self.blocks_c(self.reduction_b(x))


@register("inception_v4", **_V4, supports_drop_path=False)
def inception_v4(**kw) -> InceptionV4:
    return InceptionV4(**kw)


# -- Inception-ResNet ----------------------------------------------------------------------


class InceptionResBlock(nn.Module):
    """x + scale * conv1x1(concat(branches)), then ReLU (none for the released net's last block)."""

    def __init__(self, branches: Concat, cat_ch: int, out_ch: int, scale: float, act: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.branches = branches
        self.conv = nn.Conv2d(cat_ch, out_ch, 1)
        self.scale = scale
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.drop_path(self.conv(self.branches(x)) * self.scale))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def ir_a(ch: int, widths: tuple[int, int, int], dp: float, scale: float = 0.17) -> InceptionResBlock:
    """35x35 block (Fig. 10 / 16): 32 | 32 -> 32 | 32 -> w1 -> w2."""
    b, w1, w2 = widths
    br = Concat(_c(ch, b, 1), nn.Sequential(_c(ch, b, 1), _c(b, b, 3)),
                nn.Sequential(_c(ch, b, 1), _c(b, w1, 3), _c(w1, w2, 3)))
    return InceptionResBlock(br, 2 * b + w2, ch, scale, drop_path=dp)


def ir_b(ch: int, widths: tuple[int, int, int, int], dp: float, scale: float = 0.10) -> InceptionResBlock:
    """17x17 block (Fig. 11 / 17): b0 | r -> 1x7 w1 -> 7x1 w2."""
    b0, r, w1, w2 = widths
    br = Concat(_c(ch, b0, 1), nn.Sequential(_c(ch, r, 1), _c(r, w1, (1, 7)), _c(w1, w2, (7, 1))))
    return InceptionResBlock(br, b0 + w2, ch, scale, drop_path=dp)


def ir_c(ch: int, widths: tuple[int, int, int, int], dp: float, scale: float = 0.20, act: bool = True):
    """8x8 block (Fig. 13 / 19): b0 | r -> 1x3 w1 -> 3x1 w2."""
    b0, r, w1, w2 = widths
    br = Concat(_c(ch, b0, 1), nn.Sequential(_c(ch, r, 1), _c(r, w1, (1, 3)), _c(w1, w2, (3, 1))))
    return InceptionResBlock(br, b0 + w2, ch, scale, act, drop_path=dp)


def reduction_b_ir(in_ch: int, w: tuple[int, int, int, int]) -> Concat:
    """Fig. 12 / 18: 1x1 256 -> 3x3/2 w0 | 1x1 256 -> 3x3/2 w1 | 1x1 256 -> 3x3 w2 -> 3x3/2 w3 | pool."""
    w0, w1, w2, w3 = w
    return Concat(nn.Sequential(_c(in_ch, 256, 1), _v(256, w0, 3, 2)),
                  nn.Sequential(_c(in_ch, 256, 1), _v(256, w1, 3, 2)),
                  nn.Sequential(_c(in_ch, 256, 1), _c(256, w2, 3), _v(w2, w3, 3, 2)), max_pool())


class InceptionResNet(Backbone):
    """Inception-ResNet-v1 (``version=1``) or -v2 (``version=2``, ``layout`` "released" | "paper")."""

    def __init__(self, version: int = 2, layout: str = "released", num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.2, drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes)
        if version not in (1, 2):
            raise ValueError(f"Inception-ResNet version must be 1 or 2, got {version!r}")
        if layout not in ("released", "paper"):
            raise ValueError(f"layout must be 'released' or 'paper', got {layout!r}")
        self.min_input_size = 75
        released = version == 2 and layout == "released"
        if version == 1:
            n = (5, 10, 5)
        else:
            n = (10, 20, 10) if released else (5, 10, 5)
        rates = iter(drop_path_rates(drop_path_rate, sum(n)))
        if version == 2 and layout == "paper":
            s2, s4, rest = v4_stem(in_chans)
            self.stem, self.stem_s4, self.stem_rest = s2, s4, rest
            c35, c17, c8, s4_ch = 384, 1152, 2144, 160
        else:
            self.stem = nn.Sequential(_v(in_chans, 32, 3, 2), _v(32, 32, 3), _c(32, 64, 3))  # 147x147x64
            self.stem_s4 = nn.Sequential(max_pool(), _c(64, 80, 1), _v(80, 192, 3))  # 71x71x192
            if version == 1:
                self.stem_rest = _v(192, 256, 3, 2)  # 35x35x256
                c35, c17, c8 = 256, 896, 1792
            else:  # TF-slim's Mixed_5b
                self.stem_rest = nn.Sequential(max_pool(), Concat(
                    _c(192, 96, 1), nn.Sequential(_c(192, 48, 1), _c(48, 64, 5)),
                    nn.Sequential(_c(192, 64, 1), _c(64, 96, 3), _c(96, 96, 3)), _pool_proj(192, 64)))
                c35, c17, c8 = 320, 1088, 2080
            s4_ch = 192
        if version == 1:
            a, ra, b, rb, c = (32, 32, 32), (192, 192, 256, 384), (128, 128, 128, 128), (384, 256, 256, 256), \
                (192, 192, 192, 192)
        else:
            a, ra, b, rb, c = (32, 48, 64), (256, 256, 384, 384), (192, 128, 160, 192), (384, 288, 288, 320), \
                (192, 192, 224, 256)
        self.blocks_a = nn.Sequential(*[ir_a(c35, a, next(rates)) for _ in range(n[0])])
        self.reduction_a = reduction_a(c35, *ra)
        self.blocks_b = nn.Sequential(*[ir_b(c17, b, next(rates)) for _ in range(n[1])])
        self.reduction_b = reduction_b_ir(c17, rb)
        blocks_c = [ir_c(c8, c, next(rates)) for _ in range(n[2])]
        if released:  # the last block8: scale 1, no ReLU, then a 1x1 conv to 1536
            blocks_c[-1] = ir_c(c8, c, blocks_c[-1].drop_path.p, scale=1.0, act=False)
        self.blocks_c = nn.Sequential(*blocks_c)
        self.conv_last = _c(c8, 1536, 1) if released else nn.Identity()
        out = 1536 if released else c8
        self.stage_info = [FeatureInfo("stem", 64, 2), FeatureInfo("stem_s4", s4_ch, 4),
                             FeatureInfo("blocks_a", c35, 8), FeatureInfo("blocks_b", c17, 16),
                             FeatureInfo("blocks_c", out, 32)]
        self.head = ClassifierHead(out, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.stem(x)
        yield x
        x = self.stem_s4(x)
        yield x
        x = self.blocks_a(self.stem_rest(x))
        yield x
        x = self.blocks_b(self.reduction_a(x))
        yield x
        yield self.conv_last(self.blocks_c(self.reduction_b(x)))


@register("inception_resnet_v1", **_V4, version=1)
@register("inception_resnet_v2", **_V4, version=2)
def inception_resnet(**kw) -> InceptionResNet:
    return InceptionResNet(**kw)
