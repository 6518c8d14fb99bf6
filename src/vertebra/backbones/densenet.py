"""DenseNet: Huang, Liu, van der Maaten & Weinberger, "Densely Connected Convolutional Networks"
(CVPR 2017, arXiv 1608.06993).

Every layer of a dense block receives the concatenation of the block input and of all the
earlier layers' outputs, and adds k ("growth rate") new feature maps. The networks here are
the paper's DenseNet-BC: each layer is a bottleneck BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv
(k); transition layers between blocks are BN-ReLU-1x1 conv with compression theta = 0.5
followed by 2x2 average pooling.

- ImageNet (Table 1): a 7x7/2 convolution of 2k channels (BN-ReLU) and a 3x3/2 max-pool,
  four dense blocks, a final BN-ReLU, global average pooling and the classifier.
  DenseNet-121/169/201/264 use k = 32 and (6,12,24,16) / (6,12,32,32) / (6,12,48,32) /
  (6,12,64,48) layers; DenseNet-161 uses k = 48, a 96-channel stem and (6,12,36,24).
- CIFAR (Sec. 3, "Implementation details"): a 3x3 convolution of 2k channels (no BN: the
  first dense layer starts with BN-ReLU), three dense blocks of (L-4)/6 bottleneck layers at
  32/16/8 pixels. ``densenet_bc_100_12`` is DenseNet-BC (L=100, k=12).

Features are the dense blocks' outputs (the concatenation, before the transition); the last
one carries the network's final BN-ReLU. ImageNet: stem (s2), block1..block4 (s4..s32).
CIFAR: block1..block3 at strides 1, 2, 4.

``memory_efficient=True`` checkpoints the concatenation + BN + ReLU + 1x1 convolution of every
dense layer (the "shared memory" implementation of Pleiss et al., arXiv 1707.06990): the
concatenated tensor is recomputed during the backward pass instead of being kept, which makes
the memory of a block linear in its depth. Outputs, gradients and BatchNorm running statistics
are identical to the plain network (the recomputation does not update the running statistics
a second time).

``drop_rate`` is the paper's dropout after each dense layer's 3x3 conv (used on CIFAR without
augmentation only); DenseNet has no residual branches, so ``drop_path_rate`` must be 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct
from ..registry import register

_DENSENET = dict(family="DenseNet", paper="Densely Connected Convolutional Networks (CVPR 2017)", year=2016,
                 arxiv="1608.06993", supports_drop_path=False)


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size * k) - BN-ReLU-3x3 conv (k) on the concatenation of its inputs."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.0,
                 memory_efficient: bool = False):
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, growth_rate, 3, 1, 1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bottleneck(self, inputs: list[Tensor]) -> Tensor:
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(x)))

    def fuse_for_inference(self) -> None:
        """After ``layers.fused.fuse_conv_act``: norm1-relu1-conv1 as a clamp and a convolution
        (``layers.fused.PreActConv``), norm2 and relu2 folded into conv1."""
        from ..layers.fused import FusedConv, preact_conv

        if not (isinstance(self.conv1, FusedConv) and isinstance(self.relu1, nn.ReLU)
                and isinstance(self.relu2, nn.ReLU)):
            return
        if self.conv1.absorb_bn(self.norm2, relu=True):
            self.norm2, self.relu2 = nn.Identity(), nn.Identity()
        pre = preact_conv(self.norm1, self.conv1)
        if pre is not None:
            self.norm1, self.relu1, self.conv1 = nn.Identity(), nn.Identity(), pre

    def _checkpointed_bottleneck(self, inputs: list[Tensor]) -> Tensor:
        calls = [0]

        def run(*xs: Tensor) -> Tensor:
            x = torch.cat(xs, 1)
            calls[0] += 1
            n = self.norm1
            if calls[0] > 1 and n.training and n.track_running_stats:
                # the recomputation during backward: the same batch statistics, but the running
                # statistics (updated by the first call) must not move twice: update copies
                x = F.batch_norm(x, n.running_mean.clone(), n.running_var.clone(), n.weight, n.bias, True, 0.0,
                                 n.eps)
            else:
                x = n(x)
            return self.conv1(self.relu1(x))

        return cp.checkpoint(run, *inputs, use_reentrant=False)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            out = self._checkpointed_bottleneck(inputs)
        else:
            out = self.bottleneck(inputs)
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, self.drop_rate, self.training)
        return out


class DenseBlock(nn.Module):
    """``num_layers`` dense layers (children ``denselayer1``...); returns the concatenation."""

    def __init__(self, num_layers: int, in_ch: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.0,
                 memory_efficient: bool = False):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size,
                                                             drop_rate, memory_efficient))
        self.out_channels = in_ch + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self._forward_into_buffer(x)
        features = [x]
        for layer in self.children():
            features.append(layer(features))
        return torch.cat(features, 1)

    def _forward_into_buffer(self, x: Tensor) -> Tensor:
        """Without autograd: each layer writes its k channels into the block's output and reads the channels
        before them as a view of it, so no layer concatenates its inputs (same values as the list path)."""
        n, c, h, w = x.shape
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 else \
            torch.contiguous_format
        out = torch.empty((n, self.out_channels, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        out[:, :c].copy_(x)
        for layer in self.children():
            y = layer([out[:, :c]])
            out[:, c:c + y.shape[1]].copy_(y)
            c += y.shape[1]
        return out


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression) - 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(Backbone):
    """DenseNet-BC for ImageNet (``cifar=False``: 7x7/2 stem + max-pool) or CIFAR (3x3 stem)."""

    def __init__(self, block_config: tuple[int, ...] = (6, 12, 24, 16), growth_rate: int = 32,
                 num_init_features: int | None = None, bn_size: int = 4, compression: float = 0.5,
                 cifar: bool = False, drop_rate: float = 0.0, memory_efficient: bool = False,
                 num_classes: int = 1000, in_chans: int = 3):
        super().__init__(in_chans, num_classes)
        self.cifar = cifar
        ch = num_init_features or 2 * growth_rate
        if cifar:
            self.min_input_size = 8
            self.conv0 = nn.Conv2d(in_chans, ch, 3, 1, 1, bias=False)
        else:
            self.conv0 = ConvBnAct(in_chans, ch, 7, 2, 3)
            self.pool0 = nn.MaxPool2d(3, 2, 1)
            self.stage_info.append(FeatureInfo("conv0", ch, 2))
        first_stride = 1 if cifar else 4
        n = len(block_config)
        for i, layers in enumerate(block_config):
            block = DenseBlock(layers, ch, growth_rate, bn_size, drop_rate, memory_efficient)
            self.add_module(f"denseblock{i + 1}", block)
            ch = block.out_channels
            self.stage_info.append(FeatureInfo(f"denseblock{i + 1}", ch, first_stride * 2**i))
            if i != n - 1:
                out = int(ch * compression)
                self.add_module(f"transition{i + 1}", Transition(ch, out))
                ch = out
        self.norm5 = nn.BatchNorm2d(ch)
        self.head = ClassifierHead(ch, num_classes)
        init_weights(self)

    @property
    def memory_efficient(self) -> bool:
        return any(m.memory_efficient for m in self.modules() if isinstance(m, DenseLayer))

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, DenseLayer):
                m.memory_efficient = bool(value)

    def stages(self, x: Tensor):
        x = self.conv0(x)
        if not self.cifar:
            yield x
            x = self.pool0(x)
        i = 1
        while True:
            x = getattr(self, f"denseblock{i}")(x)
            trans = getattr(self, f"transition{i}", None)
            if trans is None:
                # the network's final BN-ReLU belongs to the last stage
                yield F.relu(self.norm5(x), inplace=True)
                return
            yield x
            x = trans(x)
            i += 1


@register("densenet121", **_DENSENET, references=("timm:densenet121",), block_config=(6, 12, 24, 16), growth_rate=32)
@register("densenet169", **_DENSENET, references=("timm:densenet169",), block_config=(6, 12, 32, 32), growth_rate=32)
@register("densenet201", **_DENSENET, references=("timm:densenet201",), block_config=(6, 12, 48, 32), growth_rate=32)
@register("densenet264", **_DENSENET, block_config=(6, 12, 64, 48), growth_rate=32)
@register("densenet161", **_DENSENET, references=("timm:densenet161",), block_config=(6, 12, 36, 24), growth_rate=48,
          num_init_features=96)
@register("densenet_bc_100_12", **_DENSENET, block_config=(16, 16, 16), growth_rate=12,
          cifar=True)
def densenet(**kw) -> DenseNet:
    return DenseNet(**kw)
