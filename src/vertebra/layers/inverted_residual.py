"""The inverted residual with a linear bottleneck (Sandler et al., "MobileNetV2", CVPR 2018),
as MnasNet (Tan et al., CVPR 2019) reuses it with 3x3/5x5 kernels and squeeze-and-excitation.

``1x1 expand (BN, act) -> kxk depthwise (BN, act) -> [SE] -> 1x1 project (BN, no act)``, with an
identity shortcut when the stride is 1 and the widths match. With ``expand_ratio=1`` the
expansion is left out: that is MobileNetV2's first block and MnasNet's "SepConv" block
(depthwise -> BN -> act -> pointwise -> BN, linear). Children are named ``conv_pw``,
``conv_dw``, ``se``, ``conv_pwl`` in the order they run, so state_dicts of torchvision and timm
pair with it tensor by tensor.
"""

from __future__ import annotations

from torch import Tensor, nn

from .conv_bn import ConvBnAct, conv_bn
from .drop_path import DropPath
from .se import SqueezeExcite


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, expand_ratio: float = 6, kernel_size: int = 3,
                 act: type[nn.Module] = nn.ReLU6, se_ratio: float = 0.0, drop_path: float = 0.0,
                 mid_ch: int | None = None, bn_eps: float = 1e-5) -> None:
        super().__init__()
        mid = mid_ch if mid_ch is not None else int(round(in_ch * expand_ratio))
        self.conv_pw = ConvBnAct(in_ch, mid, 1, act=act, bn_eps=bn_eps) if mid != in_ch or expand_ratio != 1 else None
        self.conv_dw = ConvBnAct(mid, mid, kernel_size, stride, groups=mid, act=act, bn_eps=bn_eps)
        # SE width is relative to the block's input (MnasNet / EfficientNet convention)
        self.se = SqueezeExcite(mid, rd_channels=max(1, int(in_ch * se_ratio)), act=act) if se_ratio > 0 else None
        self.conv_pwl = conv_bn(mid, out_ch, 1, bn_eps=bn_eps)
        self.use_shortcut = stride == 1 and in_ch == out_ch
        self.drop_path = DropPath(drop_path) if self.use_shortcut and drop_path > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        out = x if self.conv_pw is None else self.conv_pw(x)
        out = self.conv_dw(out)
        if self.se is not None:
            out = self.se(out)
        out = self.conv_pwl(out)
        if not self.use_shortcut:
            return out
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + x
