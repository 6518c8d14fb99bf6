"""Convolution + BatchNorm + activation, and folding BatchNorm into the convolution."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ConvBnAct(nn.Sequential):
    """``conv -> bn -> act`` (children named ``conv``, ``bn``, ``act``; bn/act optional).

    ``padding=None`` pads ``dilation * (kernel - 1) // 2``, i.e. "same" for odd kernels at
    stride 1.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = False,
        bn: bool = True,
        act: Callable[[], nn.Module] | None = nn.ReLU,
        bn_eps: float = 1e-5,
    ) -> None:
        if padding is None:
            k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
            padding = tuple(dilation * (kk - 1) // 2 for kk in k)
        layers: dict[str, nn.Module] = {
            "conv": nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, groups, bias=bias)
        }
        if bn:
            layers["bn"] = nn.BatchNorm2d(out_ch, eps=bn_eps)
        if act is not None:
            layers["act"] = act(inplace=True) if _takes_inplace(act) else act()
        super().__init__()
        for k, v in layers.items():
            self.add_module(k, v)


def _takes_inplace(act) -> bool:
    return act in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Hardsigmoid)


def conv_bn(in_ch: int, out_ch: int, kernel_size=1, stride: int = 1, **kw) -> ConvBnAct:
    """ConvBnAct without activation (a projection shortcut, a linear bottleneck)."""
    return ConvBnAct(in_ch, out_ch, kernel_size, stride, act=None, **kw)


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` per channel, for a BatchNorm whose
    statistics are fixed: an eval-mode ``nn.BatchNorm2d`` or a ``FrozenBatchNorm2d`` (torchvision's
    or a subclass); None for anything else (a BatchNorm still training)."""
    from torchvision.ops import FrozenBatchNorm2d  # imported here: `import vertebra` stays light

    if isinstance(bn, FrozenBatchNorm2d):
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        return scale, bn.bias - bn.running_mean * scale
    if type(bn) is nn.BatchNorm2d and not bn.training and bn.track_running_stats and bn.running_var is not None:
        scale = (bn.running_var + bn.eps).rsqrt()
        if bn.affine:
            scale = scale * bn.weight
            return scale, bn.bias - bn.running_mean * scale
        return scale, -bn.running_mean * scale
    return None


@torch.no_grad()
def fold_into_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """A new convolution computing ``conv(x) * scale + shift`` (weights frozen, layout kept)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    b = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(b * scale + shift)
    fused.requires_grad_(False)
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
        fused = fused.to(memory_format=torch.channels_last)
    return fused


@torch.no_grad()
def fold_bn_pairs(module: nn.Module) -> int:
    """Fold every fixed-statistics BatchNorm (see :func:`bn_affine`) that directly follows a
    convolution inside an ``nn.Sequential`` (``ConvBnAct`` included) into it; returns how many."""
    count = 0
    for seq in list(module.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and (affine := bn_affine(bn)) is not None:
                seq._modules[a] = fold_into_conv(conv, *affine)
                seq._modules[b] = nn.Identity()
                count += 1
    return count


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, in place.

    The model must be in eval mode: folding uses the running statistics. Returns the model.
    """
    if model.training:
        raise RuntimeError("fold_batchnorm needs a model in eval mode (it folds the running statistics)")
    fold_bn_pairs(model)
    return model
