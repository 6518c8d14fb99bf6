"""Pre-activation residual units (He et al., "Identity Mappings in Deep Residual Networks").

BN -> ReLU -> conv, twice (basic) or three times (bottleneck), added to a clean identity
path: no ReLU after the addition. Where the shape changes the shortcut is a 1x1 convolution
(no BN) of the pre-activated input. Shared by the pre-activation ResNets and the CIFAR Wide
ResNets (which put dropout between the two 3x3 convolutions).

For inference (``fuse_for_inference``, called by ``layers.fused.fuse_conv_act`` after the convolutions became
``FusedConv``s): the BN -> ReLU that follows a convolution inside the unit is folded into it (conv + ReLU in one
call), the addition runs as the last convolution's post-op, and the bottleneck's entry ``relu(bn1(x))``, read only
by 1x1 convolutions, becomes one clamp with its scale and shift in their weights (``layers.fused.fold_preact``).
From seven elementwise passes over the activations per bottleneck to one.
"""

from __future__ import annotations

from torch import Tensor, nn

from .drop_path import DropPath


def _fold_inner(conv: nn.Module, bn: nn.Module) -> bool:
    """``bn -> relu`` after ``conv`` folded into it (a FusedConv with fixed-statistics ``bn``); False where not."""
    from .fused import FusedConv

    return isinstance(conv, FusedConv) and conv.absorb_bn(bn, relu=True)


class _PreActFusion:
    """What the units' forwards read once ``fuse_for_inference`` ran: ``fused`` (the inner BN-ReLUs are in the
    convolutions, the addition in the last one's call) and the submodule ``pre`` (the entry's clamp) where it was
    made."""

    fused: bool = False

    def _entry(self, x: Tensor) -> Tensor:
        pre = self._modules.get("pre")  # a submodule only once fused (no class attribute: it would shadow it)
        if pre is not None:
            return pre(x)
        return x if self.bn1 is None else self.act(self.bn1(x))


class PreActBasic(_PreActFusion, nn.Module):
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
        pre = self._entry(x)
        sc = x if self.shortcut is None else self.shortcut(pre)
        if self.fused:  # conv1 carries bn2 and the ReLU; the addition is conv2's post-op
            return self.conv2.add(self.drop(self.conv1(pre)), sc)
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act(self.bn2(out))))
        return self.drop_path(out) + sc

    def fuse_for_inference(self) -> None:
        """bn2 and its ReLU into conv1, the addition into conv2 (the entry BN-ReLU stays: conv1 is padded)."""
        from .fused import FusedConv

        if not isinstance(self.conv2, FusedConv) or self.conv2.relu or not _fold_inner(self.conv1, self.bn2):
            return  # _fold_inner changes nothing where it returns False
        self.bn2 = nn.Identity()
        self.fused = True


class PreActBottleneck(_PreActFusion, nn.Module):
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
        pre = self._entry(x)
        sc = x if self.shortcut is None else self.shortcut(pre)
        if self.fused:  # conv1 carries bn2 + ReLU, conv2 bn3 + ReLU; the addition is conv3's post-op
            return self.conv3.add(self.drop(self.conv2(self.conv1(pre))), sc)
        out = self.conv1(pre)
        out = self.conv2(self.act(self.bn2(out)))
        out = self.conv3(self.drop(self.act(self.bn3(out))))
        return self.drop_path(out) + sc

    def fuse_for_inference(self) -> None:
        """bn2 / bn3 and their ReLUs into conv1 / conv2, the addition into conv3, and the entry's BN-ReLU as one
        clamp folded into conv1 and the projection shortcut (both 1x1)."""
        from .conv_bn import bn_affine
        from .fused import FusedConv, fold_preact

        if not all(isinstance(c, FusedConv) and not c.relu for c in (self.conv1, self.conv2, self.conv3)) \
                or bn_affine(self.bn2) is None or bn_affine(self.bn3) is None:
            return
        _fold_inner(self.conv1, self.bn2)
        _fold_inner(self.conv2, self.bn3)
        self.bn2, self.bn3 = nn.Identity(), nn.Identity()
        self.fused = True
        if self.bn1 is not None:
            readers = [self.conv1] + ([self.shortcut] if self.shortcut is not None else [])
            clamp = fold_preact(self.bn1, readers)
            if clamp is not None:
                self.pre, self.bn1 = clamp, nn.Identity()
