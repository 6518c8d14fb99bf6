"""Pre-activation residual units (He et al., "Identity Mappings in Deep Residual Networks").

BN -> ReLU -> conv, twice (basic) or three times (bottleneck), added to a clean identity
path: no ReLU after the addition. Where the shape changes the shortcut is a 1x1 convolution
(no BN) of the pre-activated input. Shared by the pre-activation ResNets and the CIFAR Wide
ResNets (which put dropout between the two 3x3 convolutions).
"""

from __future__ import annotations

from torch import Tensor, nn

from .drop_path import DropPath


class PreActBasic(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, drop_rate: float = 0.0, drop_path: float = 0.0,
                 preact: bool = True):
        super().__init__()
        out_ch = width * self.expansion
        # preact=False: the input is already BN-ReLU'd (the unit after the stem, He et al. Sec. 4.1)
        self.bn1 = nn.BatchNorm2d(in_ch) if preact else None
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.act = nn.ReLU(inplace=False)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if stride != 1 or in_ch != out_ch else None
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        pre = x if self.bn1 is None else self.act(self.bn1(x))
        sc = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act(self.bn2(out))))
        return self.drop_path(out) + sc


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, drop_rate: float = 0.0, drop_path: float = 0.0,
                 preact: bool = True, stride_in_1x1: bool = False):
        super().__init__()
        out_ch = width * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn1 = nn.BatchNorm2d(in_ch) if preact else None
        self.conv1 = nn.Conv2d(in_ch, width, 1, s1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, s3, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.act = nn.ReLU(inplace=False)
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if stride != 1 or in_ch != out_ch else None
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        pre = x if self.bn1 is None else self.act(self.bn1(x))
        sc = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.act(self.bn2(out)))
        out = self.conv3(self.drop(self.act(self.bn3(out))))
        return self.drop_path(out) + sc
