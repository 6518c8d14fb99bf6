"""The convolutions of CPU training that oneDNN's direct algorithm runs slowly, routed to faster equivalents: a
convolution whose weight outweighs its activations as one matrix product (here), and in float32 a wide 3x3
stride-1 convolution over many pixels as a Winograd F(4x4, 3x3) one (``layers.winograd.WinogradConv2d``).

At a detector's training sizes the last stage of a backbone sees a few pixels through a large weight: ResNet-18's
layer4 at 128 px input is 4 x 4 pixels per image through 512 x 512 x 3 x 3 weights. oneDNN reorders the weight into
its blocked layout for the forward, the data gradient and the weight gradient of every call, and at that size the
reorders cost more than the arithmetic (a bf16 forward and backward of that layer at batch 8: 9.4 ms, of which the
three products are under 2 ms). Written as ``im2col`` and matrix products, the weight is used in the layout it has
(a channels_last weight is a ``[C_out, kh * kw * C_in]`` matrix as it stands) and the products run in MKL / oneDNN's
GEMM: 4.0 ms for that layer.

:func:`weight_bound` is the rule (its measurements: ``benchmarks/RESULTS.md``, "engine thresholds"): in float32
the im2col matrix no larger than the weight (output pixels over the batch <= C_out) and a weight of at least
2**20 elements; in bf16 / fp16, where the matrix products run on the tile units and oneDNN's small-image
convolutions do not, up to twice as many pixels and weights from 2**19 elements. A rule rather than a timing,
so that a resumed run makes the same choices and continues bit for bit. :class:`TrainingConvs` is a
``TorchFunctionMode`` that sends the 2-D convolutions these rules admit, and only where autograd records
(training), to :class:`GemmConv2d`; every other call runs as it was. The engine enters it
around the training forward on CPU (:func:`training_convs`). The results are those of the convolution up to
float rounding (the same products summed in another order); under autocast the inputs are cast to autocast's dtype
as its convolution would.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from .winograd import WinogradConv2d, winograd_trainable

__all__ = ["GemmConv2d", "TrainingConvs", "gemm_conv2d", "training_convs", "weight_bound"]

#: per compute dtype class: (the smallest weight, in elements, whose reorders outweigh a convolution's arithmetic on
#: a few pixels; the most output pixels over the batch per output channel)
_RULE = {"float32": (1 << 20, 1), "half": (1 << 19, 2)}


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(i) for i in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def weight_bound(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                 dtype: torch.dtype | None = None) -> bool:
    """Whether a 2-D convolution is better run as one matrix product: ungrouped, undilated, numeric padding, and
    in float32 (``dtype``, default ``x``'s) a weight of at least 2**20 elements and no more output pixels over the
    batch than output channels (the im2col matrix, pixels x C_in k k, is then no larger than the weight, C_out x
    C_in k k); in bf16 / fp16 a weight of at least 2**19 elements and up to 2 x C_out pixels."""
    if groups != 1 or x.dim() != 4 or weight.dim() != 4 or isinstance(padding, str) or _pair(dilation) != (1, 1):
        return False
    dtype = x.dtype if dtype is None else dtype
    min_weight, per_channel = _RULE["half" if dtype in (torch.bfloat16, torch.float16) else "float32"]
    if weight.numel() < min_weight:
        return False
    (kh, kw), (sh, sw), (ph, pw) = weight.shape[2:], _pair(stride), _pair(padding)
    ho, wo = _out_size(x.shape[2], kh, sh, ph), _out_size(x.shape[3], kw, sw, pw)
    return ho > 0 and wo > 0 and x.shape[0] * ho * wo <= per_channel * weight.shape[0]


def _im2col(x: Tensor, kh: int, kw: int, stride: tuple[int, int], padding: tuple[int, int]) -> tuple[Tensor, int, int]:
    """``[N * Ho * Wo, kh * kw * C]`` patches of ``x`` (NCHW of any layout) in (ky, kx, c) order, with Ho, Wo."""
    n, c, h, w = x.shape
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
    xh = x.permute(0, 2, 3, 1)  # NHWC: a view of a channels_last tensor
    if ph or pw:
        xh = F.pad(xh, (0, 0, pw, pw, ph, ph))
    s = xh.stride()
    patches = xh.as_strided((n, ho, wo, kh, kw, c), (s[0], sh * s[1], sw * s[2], s[1], s[2], s[3]),
                            xh.storage_offset())
    return patches.reshape(n * ho * wo, kh * kw * c), ho, wo


class GemmConv2d(torch.autograd.Function):
    """``conv2d(x, weight, bias, stride, padding)`` (groups 1, dilation 1) as im2col and matrix products, forward
    and backward. The output is channels_last (the product's rows are its pixels)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int]) -> Tensor:
        co, ci, kh, kw = weight.shape
        cols, ho, wo = _im2col(x, kh, kw, stride, padding)
        wmat = weight.permute(0, 2, 3, 1).reshape(co, kh * kw * ci)  # a view of a channels_last weight
        # the product written into a channels_last tensor that is returned as it is (not a view made here: the
        # caller may apply an in-place ReLU to it)
        out = torch.empty((x.shape[0], co, ho, wo), dtype=cols.dtype, device=cols.device,
                          memory_format=torch.channels_last)
        rows = out.permute(0, 2, 3, 1).view(-1, co)
        if bias is not None:
            torch.addmm(bias, cols, wmat.t(), out=rows)
        else:
            torch.mm(cols, wmat.t(), out=rows)
        ctx.save_for_backward(cols, wmat)
        ctx.geometry = (tuple(x.shape), x.dtype, (kh, kw), stride, padding, ho, wo, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        cols, wmat = ctx.saved_tensors
        (n, ci, h, w), dtype, (kh, kw), (sh, sw), (ph, pw), ho, wo, has_bias = ctx.geometry
        co = wmat.shape[0]
        g = grad.permute(0, 2, 3, 1).reshape(n * ho * wo, co).to(cols.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[1]:
            gw = (g.t() @ cols).view(co, kh, kw, ci).permute(0, 3, 1, 2)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        if ctx.needs_input_grad[0]:
            dcols = (g @ wmat).view(n, ho, wo, kh, kw, ci)
            padded = torch.zeros((n, h + 2 * ph, w + 2 * pw, ci), dtype=dcols.dtype, device=dcols.device)
            for i in range(kh):  # col2im: each kernel tap adds its share back where it read
                for j in range(kw):
                    padded[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += dcols[:, :, :, i, j]
            gx = padded[:, ph:ph + h, pw:pw + w].permute(0, 3, 1, 2).to(dtype)
        return gx, gw, gb, None, None


def gemm_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """:class:`GemmConv2d` with autocast's casts: under an enabled autocast of ``x``'s device the three inputs in
    its dtype, as its convolution would take them."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(kind, enabled=False):
            return GemmConv2d.apply(x, weight, bias, _pair(stride), _pair(padding))
    return GemmConv2d.apply(x, weight, bias, _pair(stride), _pair(padding))


def _conv_args(args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    return [args[i] if i < len(args) else kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))]


class TrainingConvs(TorchFunctionMode):
    """Within it, a 2-D CPU convolution whose result autograd records runs as :func:`gemm_conv2d` where
    :func:`weight_bound` admits it (in autocast's dtype), else, in float32, as
    :class:`~vertebra.layers.winograd.WinogradConv2d` where :func:`~vertebra.layers.winograd.winograd_trainable`
    admits it; every other call (and every convolution under ``no_grad`` / ``inference_mode``) as it was."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d and torch.is_grad_enabled():
            x, weight, bias, stride, padding, dilation, groups = _conv_args(args, kwargs)
            if isinstance(x, Tensor) and isinstance(weight, Tensor) and x.device.type == "cpu" \
                    and (x.requires_grad or weight.requires_grad):
                dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
                if weight_bound(x, weight, stride, padding, dilation, groups, dtype):
                    return gemm_conv2d(x, weight, bias, stride, padding)
                if dtype == torch.float32 and winograd_trainable(x, weight, stride, padding, dilation, groups):
                    return WinogradConv2d.apply(x, weight, bias, _pair(padding))
        return func(*args, **kwargs)


def training_convs(device: str | torch.device):
    """The context the engine trains in: :class:`TrainingConvs` on CPU, nothing elsewhere (cuDNN chooses its own
    algorithms)."""
    return TrainingConvs() if torch.device(device).type == "cpu" else contextlib.nullcontext()
