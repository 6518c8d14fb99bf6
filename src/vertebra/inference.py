"""The inference path: BatchNorm folded into the convolutions, channels_last, optional compile; or the exported
graph in onnxruntime (``backend="onnxruntime"``, :mod:`vertebra.export.runtime`).

Memory format (``channels_last``), the per-network decision:

- ``True`` (default) follows a rule: NHWC for every network that has 2-D convolutions, NCHW for
  the rest (measured on CPU for the common families: see benchmarks/RESULTS.md, "inference layout").
- ``"measure"`` times both layouts on an example input (``example`` or 1 x C x S x S at the
  network's paper size) and keeps the faster (NCHW only when NHWC is more than 5 % slower);
  the decision is cached per (network, input shape, device) for the process.
- ``False``: NCHW.

The returned model converts its input to the chosen layout itself, so a caller's layout does not
override the decision (a channels_last input would otherwise make every convolution run NHWC).
A RetinaNet does that inside its network (``RetinaNet.prepare_inference``); any other module
through a forward pre-hook.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .layers.conv_bn import fold_batchnorm
from .layers.fused import check_winograd_mode, fuse_conv_act, set_winograd

__all__ = ["optimize_for_inference", "prefers_channels_last", "prepare_module"]

_MEASURED: dict[tuple, bool] = {}


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _time(model: nn.Module, x: torch.Tensor, runs: int = 3) -> float:
    with torch.inference_mode():
        model(x)
        best = float("inf")
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t)
    return best


def prefers_channels_last(model: nn.Module, how: bool | str = True, example: torch.Tensor | None = None) -> bool:
    """The layout decision for ``model`` (see the module docstring): ``how`` is True (rule), "measure" or False."""
    if how is False or not _has_conv(model):
        return False
    if how is True or how == "rule":
        return True
    if how != "measure":
        raise ValueError(f"channels_last must be True, False or 'measure', got {how!r}")
    if example is None:
        spec = getattr(model, "spec", None)
        size = tuple(spec.input_size) if spec is not None else (getattr(model, "in_chans", 3), 224, 224)
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        example = torch.randn(1, *size, device=dev)
    key = (getattr(model, "name", type(model).__name__), tuple(example.shape), str(example.device))
    if key not in _MEASURED:
        m = copy.deepcopy(model).eval()
        nchw = _time(m, example.contiguous())
        m = m.to(memory_format=torch.channels_last)
        nhwc = _time(m, example.contiguous(memory_format=torch.channels_last))
        _MEASURED[key] = nhwc <= 1.05 * nchw
    return _MEASURED[key]


def _layout_hook(fmt: torch.memory_format):
    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            return (args[0].contiguous(memory_format=fmt), *args[1:])
        return None

    return hook


def _dtype_hook(dtype: torch.dtype):
    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return (args[0].to(dtype), *args[1:])
        return None

    return hook


def _to_float(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(v) for v in out)
    return out


def _float_output_hook(module, args, out):
    return _to_float(out)


def prepare_module(m: nn.Module, dtype: torch.dtype | None = None, channels_last: bool = True, *,
                   fold_bn: bool = True, fuse: bool = True) -> nn.Module:
    """In place, for inference, any module in eval mode: BatchNorm folded (``fold_bn``), conv + act fused
    (``fuse``), weights channels_last and in ``dtype``; hooks convert the input to that layout and dtype and
    the output back to float32. ``Backbone.prepare_inference`` is this."""
    if fold_bn:
        fold_batchnorm(m)
        if fuse:
            fuse_conv_act(m)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        m.to(memory_format=fmt)
    if dtype is not None:
        m.to(dtype)
        m.register_forward_pre_hook(_dtype_hook(dtype))
        m.register_forward_hook(_float_output_hook)
    if _has_conv(m):
        m.register_forward_pre_hook(_layout_hook(fmt))
    return m


def optimize_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool | str = True,
                           fuse: bool = True, compile: bool = False, inplace: bool = False,
                           example: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                           backend: str = "torch", threads: int | None = None, size: int | None = None,
                           winograd: bool | str = True) -> nn.Module:
    """A copy of ``model`` (in eval mode) made for inference; outputs equal the eager model's within float rounding.

    - ``fold_bn``: every BatchNorm (also a frozen one) that follows a convolution is folded into it
      (the training statistics are no longer needed);
    - ``channels_last``: True (the rule), ``"measure"`` or False: see the module docstring; the
      model converts its input to the chosen layout;
    - ``fuse`` (with ``fold_bn``): convolution + ReLU and the residual tails add + ReLU run as
      single oneDNN calls on CPU (``layers.fused``; plain ops elsewhere and while exporting);
    - ``winograd`` (with ``fuse``, float32 on CPU): a 3x3 stride-1 convolution runs as a Winograd convolution where
      that is faster for its input shape, timed on the first call of each shape (``layers.winograd``): ``True``
      F(2x2, 3x3) or F(4x4, 3x3), whichever is fastest (F(4x4)'s float32 rounding is several times the direct
      convolution's: about 1e-5 of a layer's output scale); ``"precise"`` F(2x2) only (rounding as the direct
      one's); ``False`` never;
    - ``dtype``: ``torch.bfloat16`` (or ``torch.float16``) runs the network in that precision: the
      weights are cast (after folding), the input is cast on the way in and the output comes back
      as float32; a detector casts inside its network and postprocesses in float32 (anchors, box
      decoding, NMS). Outputs then agree with the float32 model only to that precision's rounding
      (bf16: about 3 significant digits); on CPUs with bf16 instructions it is the fast path.
    - ``compile``: ``torch.compile`` the result.
    - ``backend``: ``"torch"`` (the above), ``"compile"`` (the same as ``compile=True``) or ``"onnxruntime"``: the
      model exported to ONNX and run by onnxruntime behind the model's own call, its outputs checked against
      PyTorch's before it is returned (:mod:`vertebra.export.runtime`; float32; ``threads``: onnxruntime's intra-op
      threads; ``size``: a detector's square canvas, default its ``min_size``; ``example``: a backbone's export
      input).
    """
    from .export.runtime import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime":
        if dtype is not None or compile:
            raise ValueError("backend='onnxruntime' runs the float32 graph: leave out dtype and compile")
        from .detection.retinanet import RetinaNet
        from .export.runtime import OnnxRuntimeDetector, OnnxRuntimeModule

        m = model if inplace else copy.deepcopy(model)
        m = m.float().cpu().eval()
        if isinstance(m, RetinaNet):
            return OnnxRuntimeDetector(m, size, threads=threads)
        return OnnxRuntimeModule(m, example, threads=threads)
    compile = compile or backend == "compile"
    check_winograd_mode(winograd)  # before the copy and the folding
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    if dtype is not None:
        from .precision import check_dtype

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        check_dtype(dtype, device, flag=f"dtype={dtype}")
    from .backbone import Backbone
    from .detection.retinanet import RetinaNet

    m = model if inplace else copy.deepcopy(model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    nhwc = prefers_channels_last(m, channels_last, example)
    if isinstance(m, (Backbone, RetinaNet)):  # a RetinaNet: its network only, the postprocessing stays float32
        m.prepare_inference(dtype, nhwc, fold_bn=fold_bn, fuse=fuse)
    else:
        prepare_module(m, dtype, nhwc, fold_bn=fold_bn, fuse=fuse)
    set_winograd(m, winograd)
    if compile:
        m = torch.compile(m)
    return m
