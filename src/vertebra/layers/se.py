"""Squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018).

Global average pool -> 1x1 conv reduce -> act -> 1x1 conv expand -> gate, then rescale the
input channel-wise. SENet uses reduction 16 with ReLU and sigmoid; MnasNet puts it inside
its inverted residuals with a reduction relative to the block's input width. The two
"FC" layers are 1x1 convolutions with bias (children ``fc1`` and ``fc2``), so any network
adds it to a block without reshaping.
"""

from __future__ import annotations

from torch import Tensor, nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, rd_channels: int | None = None,
                 act: type[nn.Module] = nn.ReLU, gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        rd = rd_channels if rd_channels is not None else max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.act = act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU) else act()
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)
        self.gate = gate()

    def forward(self, x: Tensor) -> Tensor:
        s = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return x * s
