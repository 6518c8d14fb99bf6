"""Feature Pyramid Network for RetinaNet.

Lin et al., "Feature Pyramid Networks for Object Detection" (CVPR 2017, 1612.03144): a 1x1
lateral convolution on every backbone level, a top-down path that upsamples the coarser merged
map (nearest neighbour) and adds it to the lateral, and a 3x3 convolution on every merged map.
RetinaNet (1708.02002, Sec. 4) builds P3-P5 this way from C3-C5 and adds P6 = 3x3/2 conv and
P7 = 3x3/2 conv after a ReLU. The paper computes P6 from C5; torchvision's v1 RetinaNet from P5
(``LastLevelP6P7(256, 256)``): ``p6_from="p5" | "c5"``.

A backbone whose deepest stage is coarser than P3 but finer than stride 32 (say stride 16) gets
the missing pyramid levels (P5, P6, P7) from the same chain of extra stride-2 convolutions; a
backbone that cannot reach the stride of the finest level is refused with its strides.

Module names: ``lateral.i`` / ``output.i`` (one per backbone level, finest first) and ``extra.j``
(one per extra level) so that torchvision's ``inner_blocks`` / ``layer_blocks`` / ``p6``/``p7``
map one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FPN"]


class FPN(nn.Module):
    """Top-down pyramid over ``in_channels`` (finest level first) plus ``num_extra`` stride-2 levels.

    ``forward(features)`` takes the backbone maps (finest first) and returns the pyramid levels
    (finest first), ``len(in_channels) + num_extra`` maps of ``out_channels`` channels.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_extra: int = 2,
                 p6_from: str = "p5"):
        super().__init__()
        if p6_from not in ("p5", "c5"):
            raise ValueError(f"p6_from must be 'p5' (torchvision v1) or 'c5' (the paper), got {p6_from!r}")
        if not in_channels:
            raise ValueError("the FPN needs at least one backbone level")
        self.p6_from = p6_from
        self.out_channels = out_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        first_in = out_channels if p6_from == "p5" else in_channels[-1]
        self.extra = nn.ModuleList(
            nn.Conv2d(first_in if j == 0 else out_channels, out_channels, 3, stride=2, padding=1)
            for j in range(num_extra)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        n = len(self.lateral)
        if len(features) != n:
            raise ValueError(f"the FPN was built for {n} backbone levels, got {len(features)}")
        inner = self.lateral[-1](features[-1])
        outs = [self.output[-1](inner)]
        for i in range(n - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outs.append(self.output[i](inner))
        outs.reverse()
        if len(self.extra):
            x = outs[-1] if self.p6_from == "p5" else features[-1]
            for j, conv in enumerate(self.extra):
                x = conv(x if j == 0 else F.relu(x))
                outs.append(x)
        return outs
