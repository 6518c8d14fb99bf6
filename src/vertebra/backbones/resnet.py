"""ResNet and its direct descendants.

- ResNet: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016, 1512.03385).
  Table 1: a 7x7/2 stem and max-pool, then four stages of basic (18, 34) or bottleneck
  (50, 101, 152) blocks, the first block of stages 3-5 downsampling, projection shortcuts
  (option B) where the shape changes, BN after every convolution and ReLU after the addition.
  The stride of a downsampling bottleneck sits on its 3x3 convolution, as in fb.resnet.torch
  and torchvision ("ResNet v1.5": 4.1 GMACs for ResNet-50); ``stride_in_1x1=True`` builds the
  original MSRA layout, stride on the first 1x1 (the paper's 3.8 GMACs), with the same weights.
- ResNeXt: Xie et al., "Aggregated Residual Transformations" (CVPR 2017, 1611.05431): the
  bottleneck's 3x3 becomes a grouped convolution of C groups of width d (template (b) of
  Fig. 3, form (c) in code), the bottleneck width C*d doubling every stage.
- Wide ResNet: Zagoruyko & Komodakis (BMVC 2016, 1605.07146). ImageNet WRN-50-2 widens the
  bottleneck's inner width 2x; the CIFAR WRN-d-k is a pre-activation network of basic blocks
  16k/32k/64k wide with dropout between the two 3x3 convolutions.
- Stochastic depth: Huang et al. (ECCV 2016, 1603.09382). Every network here takes
  ``drop_path_rate``: block l of L drops its residual branch with rate * l / L (the paper's
  linear rule, p_L = 1 - rate). ``resnet110_sd`` (CIFAR, option-A shortcuts) and
  ``resnet152_sd`` are the paper's networks with p_L = 0.5.

CIFAR networks keep their 32x32 resolution in the first stage: their features reach stride 4
(three stages at strides 1, 2, 4), never 8.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct, DropPath, PreActBasic, conv_bn, drop_path_rates
from ..layers.fused import FusableTail
from ..registry import register

_RESNET = dict(family="ResNet", paper="Deep Residual Learning for Image Recognition (CVPR 2016)", year=2015,
               arxiv="1512.03385")
_RESNEXT = dict(family="ResNeXt", paper="Aggregated Residual Transformations for Deep Neural Networks (CVPR 2017)",
                year=2016, arxiv="1611.05431")
_WIDE = dict(family="Wide ResNet", paper="Wide Residual Networks (BMVC 2016)", year=2016, arxiv="1605.07146")
_SD = dict(family="Stochastic Depth ResNet", paper="Deep Networks with Stochastic Depth (ECCV 2016)", year=2016,
           arxiv="1603.09382")


class BasicBlock(FusableTail, nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, drop_path: float = 0.0):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("the basic block has no groups or width factor (ResNeXt/WRN use bottlenecks)")
        self.conv1 = ConvBnAct(in_ch, planes, 3, stride)
        self.conv2 = conv_bn(planes, planes, 3)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.fused_tail:
            return self.conv2.conv.add_relu(self.conv1(x), shortcut)
        return self.act(self.drop_path(self.conv2(self.conv1(x))) + shortcut)

    def tail_conv(self) -> nn.Module:
        """Inference only: conv2 + residual add + ReLU as one kernel (see layers.fused)."""
        return self.conv2.conv


class Bottleneck(FusableTail, nn.Module):
    """1x1 reduce -> 3x3 (grouped for ResNeXt) -> 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, drop_path: float = 0.0, stride_in_1x1: bool = False):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvBnAct(in_ch, width, 1, s1)
        self.conv2 = ConvBnAct(width, width, 3, s3, groups=groups)
        self.conv3 = conv_bn(width, planes * self.expansion, 1)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.fused_tail:
            return self.conv3.conv.add_relu(self.conv2(self.conv1(x)), shortcut)
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.act(self.drop_path(out) + shortcut)

    def tail_conv(self) -> nn.Module:
        """Inference only: conv3 + residual add + ReLU as one kernel (see layers.fused)."""
        return self.conv3.conv


class ResNet(Backbone):
    """The ImageNet ResNet family (ResNet, ResNeXt, WRN-50/101-2).

    Features: ``conv1`` (64, s2), ``layer1`` (s4) ... ``layer4`` (s32).
    """

    def __init__(self, block: str, layers: list[int], num_classes: int = 1000, in_chans: int = 3,
                 groups: int = 1, base_width: int = 64, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                 stride_in_1x1: bool = False, zero_init_residual: bool = False):
        super().__init__(in_chans, num_classes)
        blk = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        if stride_in_1x1 and blk is BasicBlock:
            raise ValueError("stride_in_1x1 places the stride on a bottleneck's 1x1; the basic block has none")
        blk_kw = {"stride_in_1x1": stride_in_1x1} if blk is Bottleneck else {}
        self.conv1 = ConvBnAct(in_chans, 64, 7, 2, 3)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        rates = iter(drop_path_rates(drop_path_rate, sum(layers)))
        in_ch = 64
        self.stage_info = [FeatureInfo("conv1", 64, 2)]
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            out_ch = planes * blk.expansion
            downsample = conv_bn(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else None
            blocks = []
            for j in range(n):
                blocks.append(blk(in_ch, planes, stride if j == 0 else 1, downsample if j == 0 else None,
                                  groups, base_width, next(rates), **blk_kw))
                in_ch = out_ch
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_info.append(FeatureInfo(f"layer{i + 1}", out_ch, 4 * 2**i))
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    last = m.conv3 if isinstance(m, Bottleneck) else m.conv2
                    nn.init.zeros_(last.bn.weight)

    def stages(self, x: Tensor):
        x = self.conv1(x)
        yield x
        x = self.layer1(self.maxpool(x))
        yield x
        x = self.layer2(x)
        yield x
        x = self.layer3(x)
        yield x
        yield self.layer4(x)


@register("resnet18", **_RESNET, references=("timm:resnet18",), block="basic", layers=(2, 2, 2, 2))
@register("resnet34", **_RESNET, references=("timm:resnet34",), block="basic", layers=(3, 4, 6, 3))
@register("resnet50", **_RESNET, references=("timm:resnet50",), block="bottleneck", layers=(3, 4, 6, 3))
@register("resnet101", **_RESNET, references=("timm:resnet101",), block="bottleneck", layers=(3, 4, 23, 3))
@register("resnet152", **_RESNET, references=("timm:resnet152",), block="bottleneck", layers=(3, 8, 36, 3))
@register("resnext50_32x4d", **_RESNEXT, references=("timm:resnext50_32x4d",), block="bottleneck", layers=(3, 4, 6, 3),
          groups=32, base_width=4)
@register("resnext101_32x4d", **_RESNEXT, block="bottleneck", layers=(3, 4, 23, 3), groups=32, base_width=4)
@register("resnext101_64x4d", **_RESNEXT, references=("timm:resnext101_64x4d",), block="bottleneck",
          layers=(3, 4, 23, 3), groups=64, base_width=4)
@register("wide_resnet50_2", **_WIDE, references=("timm:wide_resnet50_2",), block="bottleneck", layers=(3, 4, 6, 3),
          base_width=128)
@register("wide_resnet101_2", **_WIDE, references=("timm:wide_resnet101_2",), block="bottleneck", layers=(3, 4, 23, 3),
          base_width=128)
@register("resnet152_sd", **_SD, dataset="imagenet", references=("torchvision:resnet152", "timm:resnet152"),
          block="bottleneck", layers=(3, 8, 36, 3), drop_path_rate=0.5)
def resnet(*, block, layers, **kw) -> ResNet:
    return ResNet(block, list(layers), **kw)


# -- CIFAR -------------------------------------------------------------------------------


class CifarBasicBlock(nn.Module):
    """The CIFAR ResNet block with the paper's option-A shortcut: subsample by 2 and pad the
    new channels with zeros (no parameters)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_path: float):
        super().__init__()
        self.conv1 = ConvBnAct(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn(out_ch, out_ch, 3)
        self.stride, self.pad = stride, out_ch - in_ch
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        if self.stride != 1:
            shortcut = shortcut[:, :, :: self.stride, :: self.stride]
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return self.act(self.drop_path(self.conv2(self.conv1(x))) + shortcut)


class CifarResNet(Backbone):
    """The 6n+2-layer CIFAR ResNet (He et al. Sec. 4.2): 3x3 conv 16, then 3 stages of n basic
    blocks at 16/32/64 channels and 32/16/8 pixels, global pool, FC."""

    def __init__(self, depth: int = 110, num_classes: int = 10, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes)
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has 6n+2 layers, got depth {depth}")
        n = (depth - 2) // 6
        self.min_input_size = 8
        self.conv1 = ConvBnAct(in_chans, 16, 3)
        rates = iter(drop_path_rates(drop_path_rate, 3 * n))
        in_ch = 16
        for i, ch in enumerate((16, 32, 64)):
            blocks = [CifarBasicBlock(in_ch if j == 0 else ch, ch, 2 if (i and j == 0) else 1, next(rates))
                      for j in range(n)]
            in_ch = ch
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_info.append(FeatureInfo(f"layer{i + 1}", ch, 2**i))
        self.head = ClassifierHead(64, num_classes)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.layer1(self.conv1(x))
        yield x
        x = self.layer2(x)
        yield x
        yield self.layer3(x)


@register("resnet110_sd", **_SD, depth=110, drop_path_rate=0.5)
def resnet110_sd(**kw) -> CifarResNet:
    return CifarResNet(**kw)


class CifarWideResNet(Backbone):
    """WRN-d-k (Zagoruyko & Komodakis Table 1): conv 3x3 16, three groups of (d-4)/6
    pre-activation basic blocks 16k/32k/64k wide (dropout between their convolutions), a final
    BN+ReLU, global pool, FC."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.3, drop_path_rate: float = 0.0):
        super().__init__(in_chans, num_classes)
        if (depth - 4) % 6:
            raise ValueError(f"a WRN has 6n+4 layers, got depth {depth}")
        n = (depth - 4) // 6
        self.min_input_size = 8
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        rates = iter(drop_path_rates(drop_path_rate, 3 * n))
        in_ch = 16
        for i, ch in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = [PreActBasic(in_ch if j == 0 else ch, ch, 2 if (i and j == 0) else 1, drop_rate, next(rates))
                      for j in range(n)]
            in_ch = ch
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_info.append(FeatureInfo(f"layer{i + 1}", ch, 2**i))
        self.norm = nn.BatchNorm2d(in_ch)
        self.act = nn.ReLU(inplace=True)
        self.head = ClassifierHead(in_ch, num_classes)
        init_weights(self)

    def stages(self, x: Tensor):
        x = self.layer1(self.conv1(x))
        yield x
        x = self.layer2(x)
        yield x
        # the last stage ends with the network's final BN+ReLU: pre-activation outputs are
        # un-normalised otherwise
        yield self.act(self.norm(self.layer3(x)))


@register("wide_resnet28_10", **_WIDE, depth=28, widen=10, drop_rate=0.3)
def wide_resnet28_10(**kw) -> CifarWideResNet:
    return CifarWideResNet(**kw)
