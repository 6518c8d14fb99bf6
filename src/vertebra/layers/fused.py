"""Fused inference kernels for CPU: convolution + bias + ReLU (+ residual add) in one oneDNN call.

After BatchNorm is folded into a convolution (``fold_batchnorm``), ``conv -> relu`` and
``relu(conv(x) + shortcut)`` run as a single oneDNN primitive with post-ops, which saves a
full pass over the activation memory per layer. Used only by the inference path
(``vertebra.inference.optimize_for_inference``) and only on CPU; elsewhere (CUDA, export, a
build without oneDNN) the same module falls back to the plain ops with identical results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _capturing() -> bool:
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting() or torch.compiler.is_compiling())


class FusedConv(nn.Module):
    """A (BN-folded) convolution with an optional fused ReLU, weights kept channels_last."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FusedConv needs explicit zero padding")
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = relu
        self.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def _onednn(self, x: Tensor) -> bool:
        # plain ops whenever a graph is being captured (torch.jit.trace / the TorchScript ONNX exporter,
        # torch.export / the dynamo ONNX exporter, torch.compile): the oneDNN op must not reach a graph
        return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not _capturing() \
            and onednn_available()

    def forward(self, x: Tensor) -> Tensor:
        if self._onednn(x):
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "relu" if self.relu else "none", [], "")
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu(y) if self.relu else y

    def add_relu(self, x: Tensor, other: Tensor) -> Tensor:
        """``relu(conv(x) + other)``: the tail of a residual block, in one call."""
        if self.relu:
            raise RuntimeError("add_relu needs a convolution without its own ReLU")
        if self._onednn(x) and other.shape[1] == self.weight.shape[0]:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other.contiguous(memory_format=torch.channels_last), self.weight, self.bias, self.padding,
                self.stride, self.dilation, self.groups, "add", 1.0, "relu", [], "")
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
                      + other)


class FusableTail:
    """A residual block whose tail ``relu(conv(x) + shortcut)`` can run as one :meth:`FusedConv.add_relu`.

    The block names its tail convolution (:meth:`tail_conv`) and reads ``fused_tail`` in its forward;
    :func:`fuse_conv_act` calls :meth:`fuse_for_inference` on every such block.
    """

    fused_tail: bool = False

    def tail_conv(self) -> nn.Module:
        raise NotImplementedError

    def fuse_for_inference(self) -> None:
        conv = self.tail_conv()
        self.fused_tail = isinstance(conv, FusedConv) and not conv.relu


def fuse_conv_act(model: nn.Module) -> nn.Module:
    """Replace every folded ``ConvBnAct``-like Sequential (conv, [Identity], [ReLU]) by a FusedConv.

    Then every :class:`FusableTail` block routes its tail through :meth:`FusedConv.add_relu`.
    """
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential) or "conv" not in module._modules:
            continue
        conv = module._modules["conv"]
        rest = [m for k, m in module._modules.items() if k != "conv"]
        if type(conv) is not nn.Conv2d or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            continue
        if not all(isinstance(m, (nn.Identity, nn.ReLU)) for m in rest) or \
                sum(isinstance(m, nn.ReLU) for m in rest) > 1:
            continue
        relu = any(isinstance(m, nn.ReLU) for m in rest)
        if any(isinstance(m, nn.ReLU) for m in rest) and not isinstance(rest[-1], nn.ReLU):
            continue
        module._modules["conv"] = FusedConv(conv, relu)
        for k in list(module._modules):
            if k != "conv":
                module._modules[k] = nn.Identity()
    for module in model.modules():
        if isinstance(module, FusableTail):
            module.fuse_for_inference()
    return model
