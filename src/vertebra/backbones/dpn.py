"""Dual Path Networks: Chen, Li, Xiao, Jin, Yan & Feng, "Dual Path Networks" (NIPS 2017,
arXiv 1707.01629).

A DPN carries two paths through each stage as one tensor: a residual path of fixed width
(the first ``bw`` channels) and a densely connected path that grows by ``k`` channels per
block. Each dual-path block is a pre-activation ResNeXt bottleneck (BN-ReLU-1x1, BN-ReLU-3x3
grouped, BN-ReLU-1x1) whose output of ``bw + k`` channels is split: the first ``bw`` are
*added* to the residual path, the last ``k`` are *concatenated* to the dense path (Fig. 2e,
Table 1). The first block of each stage projects its input (BN-ReLU-1x1 conv, stride 2 from
the second stage on) to a fresh residual path and a dense path of 2k channels.

Table 1 and the released MXNet models give the configurations: DPN-92 and DPN-98 (Table 1),
DPN-68 (a 3x3/2 stem of 10 channels, bottleneck widths without the 4x expansion), DPN-107
and DPN-131 (their README):

  ======== ====== ===== ========== ================ ============
  model    stem   G     k_r (3x3)  k per stage      blocks
  ======== ====== ===== ========== ================ ============
  DPN-68   10     32    128        16, 32, 32, 64   3, 4, 12, 3
  DPN-92   64     32    96         16, 32, 24, 128  3, 4, 20, 3
  DPN-98   96     40    160        16, 32, 32, 128  3, 6, 20, 3
  DPN-107  128    50    200        20, 64, 64, 128  4, 8, 20, 3
  DPN-131  128    40    160        16, 32, 32, 128  4, 8, 28, 3
  ======== ====== ===== ========== ================ ============

The bottleneck of stage s is k_r * 2^s wide, its residual path (64, 128, 256, 512) x 4 (x 1
for DPN-68). BatchNorm eps is 1e-3 throughout, as in the released models. The network ends
with BN-ReLU before global pooling and the classifier.
``drop_path_rate`` drops the residual increment of each block (the dense increment is a
concatenation and is always kept).

Features: ``stem`` (s2), ``stage1``..``stage4`` (s4..s32), each the concatenation of both
paths (DPN-92: 336, 704, 1552, 2688 channels); the last carries the final BN-ReLU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct, DropPath, drop_path_rates
from ..registry import register

_DPN = dict(family="DPN", paper="Dual Path Networks (NIPS 2017)", year=2017, arxiv="1707.01629")
_EPS = 1e-3


class BnActConv(nn.Sequential):
    """Pre-activation convolution: BN -> ReLU -> conv (children ``bn``, ``act``, ``conv``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch, eps=_EPS)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)


class DualPathBlock(nn.Module):
    """One dual-path block. Input and output: [residual path (bw) | dense path] as one tensor."""

    def __init__(self, in_ch: int, mid: int, bw: int, inc: int, groups: int, kind: str = "normal",
                 drop_path: float = 0.0):
        super().__init__()
        if kind not in ("proj", "down", "normal"):
            raise ValueError(f"block kind must be 'proj', 'down' or 'normal', got {kind!r}")
        stride = 2 if kind == "down" else 1
        self.bw = bw
        # the first block of a stage starts both paths afresh: bw residual + 2k dense channels
        self.proj = BnActConv(in_ch, bw + 2 * inc, 1, stride) if kind != "normal" else None
        self.conv1 = BnActConv(in_ch, mid, 1)
        self.conv2 = BnActConv(mid, mid, 3, stride, groups)
        self.conv3 = BnActConv(mid, bw + inc, 1)
        self.drop_path = DropPath(drop_path)

    def fuse_for_inference(self) -> None:
        """After ``layers.fused.fuse_conv_act``: conv2's BatchNorm and ReLU folded into conv1's convolution."""
        from ..layers.fused import FusedConv, PreActConv

        first = self.conv1.conv
        inner = first.conv if isinstance(first, PreActConv) else first
        if isinstance(inner, FusedConv) and isinstance(self.conv2.act, nn.ReLU) \
                and inner.absorb_bn(self.conv2.bn, relu=True):
            self.conv2.bn, self.conv2.act = nn.Identity(), nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        paths = x if self.proj is None else self.proj(x)
        out = self.conv3(self.conv2(self.conv1(x)))
        bw = self.bw
        residual = paths[:, :bw] + self.drop_path(out[:, :bw])
        return torch.cat([residual, paths[:, bw:], out[:, bw:]], 1)


class DPN(Backbone):
    def __init__(self, k_sec: tuple[int, ...], inc_sec: tuple[int, ...], k_r: int, groups: int,
                 num_init_features: int = 64, small: bool = False, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes)
        k = 3 if small else 7
        self.stem = ConvBnAct(in_chans, num_init_features, k, 2, bn_eps=_EPS)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.stage_info = [FeatureInfo("stem", num_init_features, 2)]
        bw_factor = 1 if small else 4
        rates = iter(drop_path_rates(drop_path_rate, sum(k_sec)))
        in_ch = num_init_features
        for i, (base, depth, inc) in enumerate(zip((64, 128, 256, 512), k_sec, inc_sec)):
            bw = base * bw_factor
            mid = k_r * base // 64
            blocks = [DualPathBlock(in_ch, mid, bw, inc, groups, "proj" if i == 0 else "down", next(rates))]
            in_ch = bw + 3 * inc
            for _ in range(1, depth):
                blocks.append(DualPathBlock(in_ch, mid, bw, inc, groups, "normal", next(rates)))
                in_ch += inc
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
            self.stage_info.append(FeatureInfo(f"stage{i + 1}", in_ch, 4 * 2**i))
        self.final_bn = nn.BatchNorm2d(in_ch, eps=_EPS)
        self.final_act = nn.ReLU(inplace=True)
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.stem(x)
        yield x
        x = self.stage1(self.pool(x))
        yield x
        x = self.stage2(x)
        yield x
        x = self.stage3(x)
        yield x
        yield self.final_act(self.final_bn(self.stage4(x)))


@register("dpn68", **_DPN, small=True, num_init_features=10, k_r=128, groups=32, k_sec=(3, 4, 12, 3),
          inc_sec=(16, 32, 32, 64))
@register("dpn92", **_DPN, num_init_features=64, k_r=96, groups=32, k_sec=(3, 4, 20, 3), inc_sec=(16, 32, 24, 128))
@register("dpn98", **_DPN, num_init_features=96, k_r=160, groups=40, k_sec=(3, 6, 20, 3), inc_sec=(16, 32, 32, 128))
@register("dpn107", **_DPN, num_init_features=128, k_r=200, groups=50, k_sec=(4, 8, 20, 3),
          inc_sec=(20, 64, 64, 128))
@register("dpn131", **_DPN, num_init_features=128, k_r=160, groups=40, k_sec=(4, 8, 28, 3),
          inc_sec=(16, 32, 32, 128))
def dpn(**kw) -> DPN:
    return DPN(**kw)
