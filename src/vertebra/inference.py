"""The inference path: BatchNorm folded into the convolutions, channels_last, optional compile."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .layers.conv_bn import fold_batchnorm
from .layers.fused import fuse_conv_act

__all__ = ["optimize_for_inference"]


def optimize_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True,
                           fuse: bool = True, compile: bool = False, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (in eval mode) made for inference.

    - ``fold_bn``: every BatchNorm that follows a convolution is folded into it (the outputs
      stay equal within float rounding; the training statistics are no longer needed);
    - ``channels_last``: weights in NHWC, which oneDNN and cuDNN run faster for most nets
      (feed inputs with ``x.contiguous(memory_format=torch.channels_last)`` too);
    - ``fuse`` (with ``fold_bn``): convolution + ReLU and the residual tails add + ReLU run as
      single oneDNN calls on CPU (``layers.fused``; plain ops elsewhere, same results);
    - ``compile``: ``torch.compile`` the result.
    """
    m = model if inplace else copy.deepcopy(model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    if fold_bn:
        fold_batchnorm(m)
        if fuse:
            fuse_conv_act(m)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    if compile:
        m = torch.compile(m)
    return m
