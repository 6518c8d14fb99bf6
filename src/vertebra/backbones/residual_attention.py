"""Residual Attention Network: Wang, Jiang, Qian, Yang, Li, Zhang, Wang & Tang, "Residual Attention
Network for Image Classification" (CVPR 2017, arXiv 1704.06904).

A stack of attention modules between pre-activation bottleneck residual units (the paper's
basic unit). Each attention module (Sec. 3, Fig. 2) has

- p = 1 pre-processing unit, then two branches:
- the trunk branch T(x): t = 2 residual units;
- the soft mask branch M(x): a bottom-up top-down hourglass. Max-pooling (3x3/2) and r = 1
  residual unit per scale going down, two units at the lowest resolution, then bilinear
  up-sampling and r units per scale going up; a residual unit on each skip connection adds
  the bottom-up features of a scale to the top-down ones. It ends with BN-ReLU-1x1 conv,
  BN-ReLU-1x1 conv and a sigmoid: *mixed* attention, one weight per channel and position.
  The mask of a stage-1 module goes down 3 scales (56 -> 7 at 224 px), stage 2 two, stage 3
  one, so every mask bottoms out at the same resolution;
- attention residual learning: H(x) = (1 + M(x)) * T(x), then p = 1 post-processing unit.

ImageNet networks (Table 2): a 7x7/2 convolution of 64 (BN-ReLU) and a 3x3/2 max-pool, then a
residual unit and the attention modules of each stage at 56/28/14 pixels (256/512/1024
channels; a stride-2 unit starts stages 2 and 3), three residual units at 7x7 (2048), a final
BN-ReLU, global pooling and the classifier. Attention-56 has one module per stage, Attention-92
has 1, 2 and 3. Depth counts the trunk: 3 layers per unit, (p + t + p) units per module.

``attention92_cifar``: the paper's CIFAR Attention-92 (Sec. 4.1) takes 32x32 images. The
paper gives no table for it; this follows the same topology with a 3x3 stem of 32 channels
(BN-ReLU, no pooling), stage widths 128/256/512/1024 at 32/16/8/4 pixels, so the masks go down
32 -> 4 as the ImageNet masks go 56 -> 7.

Features: ImageNet ``stem`` (s2), ``stage1``..``stage4`` (s4..s32); CIFAR ``stage1``..``stage4``
(s1..s8). The last stage carries the final BN-ReLU. ``drop_path_rate`` applies stochastic depth
to the trunk's residual units (not the mask branch's).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct, PreActBottleneck, drop_path_rates
from ..registry import register

_RAN = dict(family="Residual Attention Network",
            paper="Residual Attention Network for Image Classification (CVPR 2017)", year=2017, arxiv="1704.06904")


def _units(ch: int, n: int, rates=None) -> nn.Sequential:
    """``n`` pre-activation bottleneck units keeping ``ch`` channels."""
    return nn.Sequential(*[PreActBottleneck(ch, ch // 4, 1, 0.0, next(rates) if rates is not None else 0.0)
                           for _ in range(n)])


class MaskHead(nn.Sequential):
    """BN-ReLU-1x1 conv, BN-ReLU-1x1 conv, sigmoid: the soft mask in [0, 1]."""

    def __init__(self, ch: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(ch)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(ch, ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(ch, ch, 1, bias=False)
        self.gate = nn.Sigmoid()


class AttentionModule(nn.Module):
    """Pre unit(s) -> trunk T and soft mask M -> (1 + M) * T -> post unit(s).

    ``levels`` is the number of max-pool steps of the mask branch (3, 2, 1 for stages 1-3).
    """

    def __init__(self, ch: int, levels: int, p: int = 1, t: int = 2, r: int = 1, rates=None):
        super().__init__()
        if levels < 1:
            raise ValueError(f"an attention module's mask goes down at least one scale, got levels={levels}")
        self.levels = levels
        self.pre = _units(ch, p, rates)
        self.trunk = _units(ch, t, rates)
        # bottom-up: pool + r units per scale; the lowest scale gets r more (its "top-down" half)
        self.down = nn.ModuleList(_units(ch, r if i < levels - 1 else 2 * r) for i in range(levels))
        # skip connections from every scale above the lowest
        self.skips = nn.ModuleList(_units(ch, 1) for _ in range(levels - 1))
        # top-down: r units after each merge, up to the second-highest scale
        self.up = nn.ModuleList(_units(ch, r) for _ in range(levels - 1))
        self.mask_head = MaskHead(ch)
        self.post = _units(ch, p, rates)

    def mask(self, x: Tensor) -> Tensor:
        downs = []
        y = x
        for blocks in self.down:
            y = blocks(F.max_pool2d(y, 3, 2, 1))
            downs.append(y)
        for i in range(self.levels - 2, -1, -1):  # merge into scale i (one step above)
            skip = self.skips[i](downs[i])
            y = F.interpolate(y, size=downs[i].shape[-2:], mode="bilinear", align_corners=False)
            y = self.up[i](y + skip)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_head(y)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        return self.post((1 + self.mask(x)) * trunk)


class ResidualAttentionNet(Backbone):
    def __init__(self, modules_per_stage: tuple[int, int, int] = (1, 1, 1), cifar: bool = False,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes)
        self.cifar = cifar
        # trunk units: the one opening each stage, p + t + p per module, two more in stage 4
        n_trunk = 4 + 2 + 4 * sum(modules_per_stage)
        rates = iter(drop_path_rates(drop_path_rate, n_trunk))
        if cifar:
            stem_ch, widths, strides = 32, (128, 256, 512, 1024), (1, 2, 4, 8)
            self.stem = ConvBnAct(in_chans, stem_ch, 3, 1)
            self.pool = nn.Identity()
        else:
            stem_ch, widths, strides = 64, (256, 512, 1024, 2048), (4, 8, 16, 32)
            self.stem = ConvBnAct(in_chans, stem_ch, 7, 2, 3)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.stage_info.append(FeatureInfo("stem", stem_ch, 2))
        in_ch = stem_ch
        for i, ch in enumerate(widths):
            blocks: list[nn.Module] = [PreActBottleneck(in_ch, ch // 4, 1 if i == 0 else 2, 0.0, next(rates))]
            if i < 3:
                blocks += [AttentionModule(ch, 3 - i, rates=rates) for _ in range(modules_per_stage[i])]
            else:
                blocks += list(_units(ch, 2, rates))
            in_ch = ch
            self.add_module(f"stage{i + 1}", nn.Sequential(*blocks))
            self.stage_info.append(FeatureInfo(f"stage{i + 1}", ch, strides[i]))
        self.final_bn = nn.BatchNorm2d(in_ch)
        self.final_act = nn.ReLU(inplace=True)
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.stem(x)
        if not self.cifar:
            yield x
        x = self.stage1(self.pool(x))
        yield x
        x = self.stage2(x)
        yield x
        x = self.stage3(x)
        yield x
        yield self.final_act(self.final_bn(self.stage4(x)))


@register("attention56", **_RAN, modules_per_stage=(1, 1, 1))
@register("attention92", **_RAN, modules_per_stage=(1, 2, 3))
@register("attention92_cifar", **_RAN, dataset="cifar10", input_size=(3, 32, 32), modules_per_stage=(1, 2, 3),
          cifar=True)
def residual_attention(**kw) -> ResidualAttentionNet:
    return ResidualAttentionNet(**kw)
