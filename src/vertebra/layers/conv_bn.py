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


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(
        bn.running_var + bn.eps
    )
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_(b * scale + shift)
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place.

    Works on any ``nn.Sequential`` whose conv is immediately followed by a BatchNorm2d
    (``ConvBnAct`` included). The model must be in eval mode: folding uses the running
    statistics. Returns the model.
    """
    if model.training:
        raise RuntimeError("fold_batchnorm needs a model in eval mode (it folds the running statistics)")
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if (
                isinstance(conv, nn.Conv2d)
                and type(bn) is nn.BatchNorm2d
                and bn.track_running_stats
                and bn.running_var is not None
            ):
                module._modules[a] = _fold(conv, bn)
                module._modules[b] = nn.Identity()
    return model
