"""ONNX and ``torch.export`` of backbones, with a numerical check against PyTorch.

Backbones (classification or ``features_only``) export as they are: ``images [B, C, H, W] ->
logits`` (or ``feature0, feature1, ...``). ONNX goes through PyTorch's TorchScript-based exporter
(``dynamo=False``: it needs no ``onnxscript``, is several times faster, and its graphs agree
with PyTorch within float rounding on every registered network, see ``tests/test_export.py``),
opset 17 by default; the batch and/or the image size can be left dynamic. ``torch.export``
writes an ``ExportedProgram`` (``.pt2``, load with ``torch.export.load``).

Files are written through :func:`vertebra._io.atomic_write`. The fused oneDNN convolutions of
:func:`vertebra.optimize_for_inference` never reach an exported graph: they fall back to ``F.conv2d``
while tracing or exporting (``layers/fused.py``). The RetinaNet exporter is ``vertebra.detection.export``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import atomic_write

__all__ = [
    "DEFAULT_OPSET",
    "ExportCheck",
    "check_onnx",
    "check_program",
    "export_onnx",
    "export_program",
    "onnx_friendly",
    "output_names",
    "example_input",
    "sample_inputs",
    "save_program",
    "write_onnx",
]

DEFAULT_OPSET = 17


# -- export-friendly modules ------------------------------------------------------------------------------------------
def _pool_matrix(n_in: int, n_out: int, dtype: torch.dtype, device) -> Tensor:
    """``[n_out, n_in]``: row i averages input cells floor(i*n/o) .. ceil((i+1)*n/o) - 1 (adaptive pooling)."""
    m = torch.zeros(n_out, n_in, dtype=dtype, device=device)
    for i in range(n_out):
        a = (i * n_in) // n_out
        b = -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


class _AdaptiveAvgPoolExport(nn.Module):
    """``AdaptiveAvgPool2d`` written with ops every exporter handles.

    Output 1x1 is a mean (any input size); an output that divides the input is a plain average
    pool; otherwise (e.g. AlexNet's 6x6 from a 1x1 map at a small input) two constant pooling
    matrices. The last two depend on the traced input size: they are exact at that size only.
    """

    def __init__(self, output_size) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        out = self.output_size
        oh, ow = (out, out) if isinstance(out, int) else out
        h, w = int(x.shape[-2]), int(x.shape[-1])
        oh = h if oh is None else int(oh)
        ow = w if ow is None else int(ow)
        if oh == 1 and ow == 1:
            return x.mean(dim=(-2, -1), keepdim=True)
        if h % oh == 0 and w % ow == 0:
            return F.avg_pool2d(x, (h // oh, w // ow))
        ph = _pool_matrix(h, oh, x.dtype, x.device)
        pw = _pool_matrix(w, ow, x.dtype, x.device)
        return torch.matmul(torch.matmul(ph, x), pw.t())


@contextlib.contextmanager
def onnx_friendly(model: nn.Module):
    """Temporarily swap modules the TorchScript-based ONNX exporter cannot handle for equivalents.

    Today: ``nn.AdaptiveAvgPool2d`` (the exporter needs the input size known and the output a
    factor of it; after a ``LocalResponseNorm`` the size is unknown to it).
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for key, child in parent._modules.items():
            if type(child) is nn.AdaptiveAvgPool2d:
                swapped.append((parent, key, child))
    try:
        for parent, key, child in swapped:
            parent._modules[key] = _AdaptiveAvgPoolExport(child.output_size)
        yield model
    finally:
        for parent, key, child in swapped:
            parent._modules[key] = child


class _Outputs(nn.Module):
    """A module whose output is a tuple of tensors (ONNX outputs are flat)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor):
        y = self.model(x)
        return tuple(y) if isinstance(y, (list, tuple)) else y


def output_names(model: nn.Module) -> list[str]:
    if getattr(model, "features_only", False):
        return [f"feature{i}_s{f.stride}" for i, f in enumerate(model.feature_info)]
    return ["logits"]


def example_input(model: nn.Module, size: int | None, batch: int) -> Tensor:
    spec = getattr(model, "spec", None)
    chans = getattr(model, "in_chans", 3)
    if size is None:
        size = spec.input_size[-1] if spec is not None else 224
    size = max(int(size), int(getattr(model, "min_input_size", 1)))
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(0))


# -- ONNX -------------------------------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, out: str | os.PathLike | io.BytesIO | None, example: Tensor | None = None, *,
                input_size: int | None = None, batch: int = 1, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False, dynamic_size: bool = False) -> bytes:
    """Export a backbone (or any ``images -> tensor(s)`` module) to ONNX; returns the model bytes.

    ``out``: a path (written atomically), a ``BytesIO`` or None (bytes only). The model is put in
    eval mode; its outputs are named ``logits`` or ``feature<i>_s<stride>`` (features_only).
    """
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: vertebra exports opset 17 or newer")
    model.eval()
    if dynamic_size:
        fixed = [n for n, m in model.named_modules() if type(m) is nn.AdaptiveAvgPool2d
                 and m.output_size not in (1, (1, 1), None, (None, None))]
        if fixed:
            raise ValueError(f"{getattr(model, 'name', type(model).__name__)} pools to a fixed grid ({fixed[0]}: "
                             "AdaptiveAvgPool2d); its ONNX graph is exact at one input size only: "
                             "export without --dynamic-size (or --features-only)")
    if example is None:
        example = example_input(model, input_size, batch)
    names = output_names(model)
    dyn: dict[str, dict[int, str]] | None = None
    if dynamic_batch or dynamic_size:
        axes: dict[int, str] = {}
        if dynamic_batch:
            axes[0] = "batch"
        if dynamic_size:
            axes.update({2: "height", 3: "width"})
        dyn = {"images": dict(axes)}
        for n in names:
            dyn[n] = {0: "batch"} if dynamic_batch else {}
            if dynamic_size and n != "logits":
                dyn[n].update({2: f"{n}_h", 3: f"{n}_w"})
    return write_onnx(_Outputs(model).eval(), (example,), out, model=model, opset_version=opset,
                      input_names=["images"], output_names=names, dynamic_axes=dyn)


def write_onnx(graph: nn.Module, args: tuple, out: str | os.PathLike | io.BytesIO | None, *, model: nn.Module,
               **onnx_kwargs) -> bytes:
    """``torch.onnx.export`` of ``graph`` (TorchScript-based, ``dynamo=False``) with ``model``'s modules made
    export-friendly (:func:`onnx_friendly`); the bytes go to ``out`` (a path, written atomically, or a buffer)
    and are returned. The one ONNX writer of backbones and detectors."""
    buf = io.BytesIO()
    with torch.no_grad(), onnx_friendly(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape checks; the checks are the judge
        torch.onnx.export(graph, args, buf, dynamo=False, do_constant_folding=True, **onnx_kwargs)
    data = buf.getvalue()
    if isinstance(out, io.BytesIO):
        out.write(data)
    elif out is not None:
        atomic_write(out, data)
    return data


def _ort_session(model_bytes_or_path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - optional extra
        raise RuntimeError("checking an ONNX export needs onnxruntime: pip install onnxruntime") from e
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    src = model_bytes_or_path if isinstance(model_bytes_or_path, bytes) else str(model_bytes_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


@dataclass
class ExportCheck:
    """The largest difference between the exported model and PyTorch on sample inputs."""

    max_abs_diff: float
    scale: float                     # largest |output| of PyTorch
    tol: float                       # allowed: atol + rtol * scale
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tol

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"{verdict}: max abs difference {self.max_abs_diff:.3g} (output scale {self.scale:.3g}, "
                f"tolerance {self.tol:.3g})" + "".join(f"\n  {d}" for d in self.details))


def _compare(outs: Sequence[Any], refs: Sequence[Tensor], label: str, acc: list[tuple[float, float, str]]) -> None:
    """Append (max abs difference, PyTorch's output scale, a line) per output; the tolerance is applied by
    :func:`_summarise`."""
    import numpy as np

    for name, o, r in zip(range(len(refs)), outs, refs):
        r = r.detach().float().cpu().numpy()
        o = np.asarray(o.detach().cpu().numpy() if isinstance(o, Tensor) else o, dtype=np.float32)
        if o.shape != r.shape:
            acc.append((math.inf, float(np.abs(r).max(initial=0.0)), f"{label} output {name}: shape {o.shape} "
                        f"vs PyTorch {r.shape}"))
            continue
        d = float(np.abs(o - r).max(initial=0.0))
        acc.append((d, float(np.abs(r).max(initial=0.0)), f"{label} output {name}: max abs diff {d:.3g}"))


def _summarise(acc, rtol: float, atol: float) -> ExportCheck:
    d = max((a[0] for a in acc), default=0.0)
    s = max((a[1] for a in acc), default=0.0)
    return ExportCheck(d, s, atol + rtol * s, [a[2] for a in acc])


def sample_inputs(example: Tensor, dynamic_batch: bool, dynamic_size: bool, min_size: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(example.shape, generator=g)]
    b, c, h, w = example.shape
    if dynamic_batch:
        xs.append(torch.randn(b + 2, c, h, w, generator=g))
    if dynamic_size:
        xs.append(torch.randn(b, c, max(min_size, h + 32), max(min_size, w + 64), generator=g))
    return xs


def check_onnx(model: nn.Module, onnx_model: bytes | str | os.PathLike, inputs: Sequence[Tensor], *,
               rtol: float = 1e-4, atol: float = 1e-5, threads: int | None = None) -> ExportCheck:
    """Run the ONNX model with onnxruntime on ``inputs`` and compare with ``model`` (eval, no grad)."""
    sess = _ort_session(onnx_model, threads)
    in_name = sess.get_inputs()[0].name
    acc: list[tuple[float, float, str]] = []
    model.eval()
    for x in inputs:
        with torch.no_grad():
            ref = model(x)
        refs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        outs = sess.run(None, {in_name: x.numpy()})
        _compare(outs, refs, f"input {tuple(x.shape)}", acc)
    return _summarise(acc, rtol, atol)


# -- torch.export -----------------------------------------------------------------------------------------------------
def export_program(model: nn.Module, out: str | os.PathLike | None, example: Tensor | None = None, *,
                   input_size: int | None = None, batch: int = 1, dynamic_batch: bool = False,
                   dynamic_size: bool = False):
    """``torch.export`` a backbone; save the ExportedProgram to ``out`` (``.pt2``) when given. Returns it."""
    from torch.export import Dim

    model.eval()
    if example is None:
        example = example_input(model, input_size, batch)
    dims: dict[int, Any] = {}
    if dynamic_batch:
        if example.shape[0] == 1:  # torch.export specialises a batch of 1
            example = example.expand(2, *example.shape[1:]).contiguous()
        dims[0] = Dim("batch", min=1, max=4096)
    if dynamic_size:
        dims[2] = Dim.AUTO
        dims[3] = Dim.AUTO
    shapes = (dims,) if dims else None
    with torch.no_grad():
        ep = torch.export.export(_Outputs(model).eval(), (example,), dynamic_shapes=shapes)
    if out is not None:
        save_program(ep, out)
    return ep


def save_program(ep, out: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return atomic_write(out, buf.getvalue())


def check_program(model: nn.Module, program, inputs: Sequence[Tensor], *, rtol: float = 1e-4,
                  atol: float = 1e-5) -> ExportCheck:
    """Run an ExportedProgram (or a ``.pt2`` path) on ``inputs`` and compare with ``model``."""
    if isinstance(program, (str, os.PathLike)):
        program = torch.export.load(str(program))
    mod = program.module()
    acc: list[tuple[float, float, str]] = []
    model.eval()
    for x in inputs:
        with torch.no_grad():
            ref = model(x)
            out = mod(x)
        refs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        _compare(outs, refs, f"input {tuple(x.shape)}", acc)
    return _summarise(acc, rtol, atol)
