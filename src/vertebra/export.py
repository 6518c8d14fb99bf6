"""Deployment: ONNX and ``torch.export`` of backbones and of RetinaNet, with a numerical check.

Backbones (classification or ``features_only``) export as they are: ``images [B, C, H, W] ->
logits`` (or ``feature0, feature1, ...``). ONNX goes through PyTorch's TorchScript-based exporter
(``dynamo=False``: it needs no ``onnxscript``, is several times faster, and its graphs agree
with PyTorch within float rounding on every registered network, see ``tests/test_export.py``),
opset 17 by default; the batch and/or the image size can be left dynamic. ``torch.export``
writes an ``ExportedProgram`` (``.pt2``, load with ``torch.export.load``).

RetinaNet exports as one graph from the *normalised, padded* batch to the detections:

    inputs   images       float32 [B, 3, S, S]   normalised with the sidecar's mean / std,
                                                 resized and zero-padded by preprocess_for_export
             image_sizes  int64   [B, 2]         (height, width) of each image inside the canvas
    outputs  boxes        float32 [D, 4]         xyxy, canvas pixels (divide by ``scales`` for the
                                                 original image)
             scores       float32 [D]
             labels       int64   [D]            class index in [0, num_classes)
             batch_index  int64   [D]            which image of the batch, ascending; by score
                                                 (descending) within an image

It reproduces ``RetinaNet.detect``: per image and pyramid level the ``topk_candidates`` best
(anchor, class) scores, decoded and clipped to the image, class-wise NMS (ONNX
``NonMaxSuppression`` with the batch and class axes, so no coordinate-offset trick) keeping
scores above ``score_thresh``, and the ``detections_per_img`` best per image. The anchors are
constants of the graph: the canvas size S is fixed at export (the batch may be dynamic).
A JSON sidecar (``<out>.json``) records mean, std, canvas size, pad multiple, categories and
thresholds; :func:`preprocess_for_export` is the preprocessing step, in ~20 lines so that it
can be ported to any runtime.

The ``.pt2`` of a RetinaNet holds the same graph (``torchvision::nms`` in place of ONNX's
operator, batched by folding the image and class into the NMS index as ``RetinaNet`` does).

Files are written to a temporary name in the target folder and renamed. The fused oneDNN
convolutions of :func:`vertebra.optimize_for_inference` never reach an exported graph: they
fall back to ``F.conv2d`` while tracing or exporting (``layers/fused.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ExportCheck",
    "RetinaNetExport",
    "check_onnx",
    "check_program",
    "export_onnx",
    "export_program",
    "export_retinanet_onnx",
    "onnx_friendly",
    "preprocess_for_export",
    "register_commands",
    "write_atomic",
]

DEFAULT_OPSET = 17


# -- files ------------------------------------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


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


def _output_names(model: nn.Module) -> list[str]:
    if getattr(model, "features_only", False):
        return [f"feature{i}_s{f.stride}" for i, f in enumerate(model.out_feature_info)]
    return ["logits"]


def _example_input(model: nn.Module, size: int | None, batch: int) -> Tensor:
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
        example = _example_input(model, input_size, batch)
    names = _output_names(model)
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
    buf = io.BytesIO()
    import warnings

    with torch.no_grad(), onnx_friendly(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape checks; the check below is the judge
        torch.onnx.export(_Outputs(model).eval(), (example,), buf, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=names, dynamic_axes=dyn,
                          do_constant_folding=True)
    data = buf.getvalue()
    if isinstance(out, io.BytesIO):
        out.write(data)
    elif out is not None:
        write_atomic(out, data)
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


def _compare(outs: Sequence[Any], refs: Sequence[Tensor], rtol: float, atol: float, label: str,
             acc: list[tuple[float, float, str]]) -> None:
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


def _sample_inputs(example: Tensor, dynamic_batch: bool, dynamic_size: bool, min_size: int) -> list[Tensor]:
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
        _compare(outs, refs, rtol, atol, f"input {tuple(x.shape)}", acc)
    return _summarise(acc, rtol, atol)


# -- torch.export -----------------------------------------------------------------------------------------------------
def export_program(model: nn.Module, out: str | os.PathLike | None, example: Tensor | None = None, *,
                   input_size: int | None = None, batch: int = 1, dynamic_batch: bool = False,
                   dynamic_size: bool = False):
    """``torch.export`` a backbone; save the ExportedProgram to ``out`` (``.pt2``) when given. Returns it."""
    from torch.export import Dim

    model.eval()
    if example is None:
        example = _example_input(model, input_size, batch)
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
    return write_atomic(out, buf.getvalue())


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
        _compare(outs, refs, rtol, atol, f"input {tuple(x.shape)}", acc)
    return _summarise(acc, rtol, atol)


# -- RetinaNet --------------------------------------------------------------------------------------------------------
def preprocess_for_export(images, size: int, mean: Sequence[float] = (0.485, 0.456, 0.406),
                          std: Sequence[float] = (0.229, 0.224, 0.225), pad_multiple: int = 32
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """The preprocessing that goes with an exported RetinaNet (its sidecar gives size, mean, std).

    ``images``: a float tensor ``B x 3 x H x W`` or a list of ``3 x H x W`` in 0..1. Each image is
    normalised ``(x - mean) / std``, resized (bilinear) by ``scale = min(size / H, size / W)`` so
    that it fits the ``size x size`` canvas, and zero-padded at the bottom/right.

    Returns ``(batch [B, 3, size, size], image_sizes [B, 2] int64 (h, w) inside the canvas,
    scales [B])``; boxes of the exported model divided by ``scales[b]`` are in original pixels.
    """
    if size % pad_multiple:
        raise ValueError(f"the canvas size {size} must be a multiple of {pad_multiple}")
    if isinstance(images, Tensor):
        images = list(images[None] if images.dim() == 3 else images)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    batch = torch.zeros(len(images), 3, size, size)
    sizes, scales = [], []
    for i, im in enumerate(images):
        if im.dim() != 3 or not im.is_floating_point():
            raise ValueError(f"images[{i}] must be a float 3 x H x W tensor in 0..1, got {tuple(im.shape)} {im.dtype}")
        h, w = im.shape[-2:]
        scale = min(size / h, size / w)
        x = F.interpolate((im[None].float() - m) / s, scale_factor=scale, mode="bilinear",
                          recompute_scale_factor=True, align_corners=False)[0]
        rh, rw = min(x.shape[-2], size), min(x.shape[-1], size)
        batch[i, :, :rh, :rw] = x[:, :rh, :rw]
        sizes.append((rh, rw))
        scales.append(scale)
    return batch, torch.tensor(sizes, dtype=torch.int64), torch.tensor(scales, dtype=torch.float32)


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (boxes [B, M, 4] xyxy, scores [B, K, M]) -> selected [S, 3] (b, k, m).

    Eagerly: torchvision's NMS per (image, class), scores above the threshold, at most
    ``max_per_class`` per (image, class); under ``torch.onnx.export`` it becomes the ONNX operator.
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou: float, score_thresh: float) -> Tensor:
        return _nms_eager(boxes, scores, max_per_class, iou, score_thresh)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou, score_thresh):
        mx = g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64))
        it = g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32))
        st = g.op("Constant", value_t=torch.tensor([score_thresh], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, mx, it, st, center_point_box_i=0)


def _nms_eager(boxes: Tensor, scores: Tensor, max_per_class: int, iou: float, score_thresh: float) -> Tensor:
    """Eager NMS of every (image, class): selected ``[S, 3]`` (image, class, candidate), by score.

    ``max_per_class`` is not applied: the caller keeps the best ``detections_per_img`` of each
    image, and those are always among the best ``detections_per_img`` of their class.
    """
    from torchvision.ops import batched_nms, nms

    b, k, m = scores.shape
    bi, ki, mi = (scores > score_thresh).nonzero(as_tuple=True)
    group = bi * k + ki
    bx, sc = boxes[bi, mi], scores[bi, ki, mi]
    if torch.compiler.is_exporting():
        # torch.export: no data-dependent branch (batched_nms picks an algorithm by size); offset the
        # boxes of every (image, class) group apart, as batched_nms does for small inputs
        offsets = group.to(bx.dtype) * (boxes.max() + 1.0)  # boxes: all candidates, never empty
        keep = nms(bx + offsets[:, None], sc, iou)
    else:
        keep = batched_nms(bx, sc, group, iou)
    return torch.stack((bi[keep], ki[keep], mi[keep]), dim=1)


class RetinaNetExport(nn.Module):
    """A RetinaNet as one exportable graph: ``(images, image_sizes) -> (boxes, scores, labels, batch_index)``.

    See the module docstring for the tensors. ``images`` is the normalised, padded canvas of
    :func:`preprocess_for_export`; the anchors are computed for ``canvas`` (H, W) at construction.
    """

    def __init__(self, model, canvas: tuple[int, int]) -> None:
        super().__init__()
        from .detection.boxes import decode_boxes

        self._decode = decode_boxes
        self.net = model.net
        post = model.postprocess
        self.num_classes = int(model.num_classes)
        self.score_thresh, self.nms_thresh = post.score_thresh, post.nms_thresh
        self.detections_per_img, self.topk_candidates = post.detections_per_img, post.topk_candidates
        self.canvas = tuple(int(v) for v in canvas)
        with torch.no_grad():
            probe = torch.zeros(1, self.net.backbone.in_chans, *self.canvas)
            levels = self.net.pyramid(probe)
        sizes = [tuple(int(s) for s in f.shape[-2:]) for f in levels]
        anchors = model.anchor_generator(self.canvas, sizes, dtype=torch.float32)
        a = model.anchor_generator.num_anchors_per_location()
        self.per_level = [h * w * n for (h, w), n in zip(sizes, a)]
        self.register_buffer("anchors", anchors.clone(), persistent=False)

    def _nms(self, boxes: Tensor, scores: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return _NonMaxSuppression.apply(boxes, scores, self.detections_per_img, self.nms_thresh,
                                            self.score_thresh)
        return _nms_eager(boxes, scores, self.detections_per_img, self.nms_thresh, self.score_thresh)

    def forward(self, images: Tensor, image_sizes: Tensor):
        cls_logits, bbox_regression = self.net(images)
        b, _, k = cls_logits.shape
        boxes_l, scores_l, labels_l = [], [], []
        start = 0
        for n in self.per_level:
            s = torch.sigmoid(cls_logits[:, start:start + n]).reshape(b, n * k)
            top = min(self.topk_candidates, n * k)
            vals, idx = s.topk(top, dim=1)
            anchor = torch.div(idx, k, rounding_mode="floor")
            labels_l.append(idx - anchor * k)
            anchor = anchor + start
            codes = bbox_regression.gather(1, anchor.unsqueeze(-1).expand(b, top, 4))
            boxes_l.append(self._decode(codes, self.anchors[anchor.reshape(-1)].reshape(b, top, 4)))
            scores_l.append(vals)
            start += n
        boxes = torch.cat(boxes_l, 1)
        scores = torch.cat(scores_l, 1)
        labels = torch.cat(labels_l, 1)
        hw = image_sizes.to(boxes.dtype)
        upper = torch.stack((hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]), dim=1).unsqueeze(1)
        boxes = torch.minimum(boxes.clamp(min=0), upper)
        # one score row per class: the candidate's score where it is of that class, -1 elsewhere
        onehot = labels.unsqueeze(1) == torch.arange(k, device=labels.device).view(1, k, 1)
        per_class = torch.where(onehot, scores.unsqueeze(1), torch.full_like(scores.unsqueeze(1), -1.0))
        sel = self._nms(boxes, per_class)  # [S, 3]: image, class, candidate
        bi, ki, mi = sel[:, 0], sel[:, 1], sel[:, 2]
        det_scores = scores[bi, mi]
        det_boxes = boxes[bi, mi]
        # by image, then by score (descending); the best detections_per_img of each image
        key = bi.to(det_scores.dtype) * 4.0 - det_scores
        order = torch.argsort(key)
        bi, ki, det_scores, det_boxes = bi[order], ki[order], det_scores[order], det_boxes[order]
        counts = (bi.unsqueeze(0) == torch.arange(b, device=bi.device).unsqueeze(1)).sum(1)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(bi.shape[0], device=bi.device) - first[bi]
        keep = rank < self.detections_per_img
        return det_boxes[keep], det_scores[keep], ki[keep], bi[keep]


def retinanet_sidecar(model, canvas: int, categories: Sequence[str] | None = None) -> dict[str, Any]:
    t = model.transform
    return {
        "format": "vertebra-retinanet-export",
        "version": 1,
        "name": model.name,
        "backbone": model.net.backbone.name,
        "num_classes": int(model.num_classes),
        "categories": list(categories) if categories else None,
        "mean": [float(v) for v in t.image_mean.flatten()],
        "std": [float(v) for v in t.image_std.flatten()],
        "size": [canvas, canvas],
        "pad_multiple": int(t.size_divisible),
        "score_thresh": model.postprocess.score_thresh,
        "nms_thresh": model.postprocess.nms_thresh,
        "detections_per_img": model.postprocess.detections_per_img,
        "topk_candidates": model.postprocess.topk_candidates,
        "inputs": {"images": "float32 [B, 3, size, size]: (x - mean) / std, resized to fit, zero-padded",
                   "image_sizes": "int64 [B, 2]: (height, width) of each image inside the canvas"},
        "outputs": {"boxes": "float32 [D, 4] xyxy in canvas pixels (divide by the scale to get input pixels)",
                    "scores": "float32 [D]", "labels": "int64 [D]",
                    "batch_index": "int64 [D], ascending; scores descending within an image"},
        "preprocess": "vertebra.export.preprocess_for_export(images, size, mean, std, pad_multiple)",
    }


def export_retinanet_onnx(model, out: str | os.PathLike | io.BytesIO | None, size: int, *, batch: int = 1,
                          opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> bytes:
    """Export a RetinaNet (eval) with its decoding and NMS to ONNX at canvas ``size x size``."""
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: vertebra exports opset 17 or newer")
    model.eval()
    wrapper = RetinaNetExport(model, (size, size)).eval()
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[size, size]] * batch, dtype=torch.int64)
    dyn = None
    if dynamic_batch:
        dyn = {"images": {0: "batch"}, "image_sizes": {0: "batch"}}
    buf = io.BytesIO()
    import warnings

    with torch.no_grad(), onnx_friendly(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (images, sizes), buf, dynamo=False, opset_version=opset,
                          input_names=["images", "image_sizes"],
                          output_names=["boxes", "scores", "labels", "batch_index"], dynamic_axes=dyn)
    data = buf.getvalue()
    if isinstance(out, io.BytesIO):
        out.write(data)
    elif out is not None:
        write_atomic(out, data)
    return data


def export_retinanet_program(model, out: str | os.PathLike | None, size: int, *, batch: int = 1):
    """``torch.export`` the RetinaNet graph (decoding + NMS) at canvas ``size``; save it as ``.pt2``."""
    model.eval()
    wrapper = RetinaNetExport(model, (size, size)).eval()
    batch = max(2, batch)  # torch.export specialises a batch of 1
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[size, size]] * batch, dtype=torch.int64)
    bdim = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        ep = torch.export.export(wrapper, (images, sizes),
                                 dynamic_shapes={"images": {0: bdim}, "image_sizes": {0: bdim}})
    if out is not None:
        save_program(ep, out)
    return ep


def reference_detections(model, batch: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
    """PyTorch's detections (``RetinaNet.detect``) of a preprocessed canvas batch, in canvas pixels."""
    from .detection.transform import ImageBatch

    sizes = [tuple(int(v) for v in s) for s in image_sizes.tolist()]
    with torch.no_grad():
        return model.eval().detect(ImageBatch(batch, sizes, sizes))


def compare_detections(refs: list[dict[str, Tensor]], boxes, scores, labels, batch_index, *,
                       rtol: float = 1e-4, atol: float = 1e-4) -> ExportCheck:
    """Detections of an export against PyTorch's: same count and labels per image, boxes and scores close."""
    import numpy as np

    boxes, scores = np.asarray(boxes, dtype=np.float32), np.asarray(scores, dtype=np.float32)
    labels, batch_index = np.asarray(labels).astype(np.int64), np.asarray(batch_index).astype(np.int64)
    details, diff, scale = [], 0.0, 0.0
    for i, ref in enumerate(refs):
        sel = batch_index == i
        rb, rs, rl = ref["boxes"].numpy(), ref["scores"].numpy(), ref["labels"].numpy()
        scale = max(scale, float(np.abs(rb).max(initial=0.0)))
        if sel.sum() != len(rs):
            details.append(f"image {i}: {int(sel.sum())} detections, PyTorch {len(rs)}")
            diff = math.inf
            continue
        eb, es, el = boxes[sel], scores[sel], labels[sel]
        if len(rs) and not (el == rl).all():
            # equal scores may come in another order: compare as sets sorted by (label, score, box)
            def _key(b, s, lab):
                return np.lexsort((b[:, 0], s, lab))
            o1, o2 = _key(eb, es, el), _key(rb, rs, rl)
            eb, es, el, rb, rs, rl = eb[o1], es[o1], el[o1], rb[o2], rs[o2], rl[o2]
            if not (el == rl).all():
                details.append(f"image {i}: labels differ")
                diff = math.inf
                continue
        d = float(max(np.abs(eb - rb).max(initial=0.0), np.abs(es - rs).max(initial=0.0)))
        details.append(f"image {i}: {len(rs)} detections, max abs diff {d:.3g}")
        diff = max(diff, d)
    return ExportCheck(diff, scale, atol + rtol * scale, details)


def check_retinanet_onnx(model, onnx_model, batch: Tensor, image_sizes: Tensor, **tol) -> ExportCheck:
    sess = _ort_session(onnx_model)
    out = sess.run(None, {"images": batch.numpy(), "image_sizes": image_sizes.numpy()})
    return compare_detections(reference_detections(model, batch, image_sizes), *out, **tol)


def check_retinanet_program(model, program, batch: Tensor, image_sizes: Tensor, **tol) -> ExportCheck:
    if isinstance(program, (str, os.PathLike)):
        program = torch.export.load(str(program))
    with torch.no_grad():
        out = program.module()(batch, image_sizes)
    return compare_detections(reference_detections(model, batch, image_sizes),
                              *[o.numpy() for o in out], **tol)


def sample_detection_batch(size: int, n: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Sample images for a check: smooth random images of two aspect ratios, through preprocess_for_export."""
    g = torch.Generator().manual_seed(seed)
    ims = []
    for i in range(n):
        h, w = (size, size * 3 // 4) if i % 2 else (size * 2 // 3, size)
        low = torch.rand(3, max(2, h // 16), max(2, w // 16), generator=g)
        ims.append(F.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0])
    return preprocess_for_export(ims, size)


# -- loading what to export -------------------------------------------------------------------------------------------
def _is_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "vertebra-checkpoint"
    except Exception:
        return False


def load_for_export(target: str, *, num_classes: int | None = None, features_only: bool = False,
                    out_strides=None, weights: str | None = None, detector: str | None = None,
                    min_size: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model to export: a registered backbone name (optionally with ``weights``), a trained
    engine checkpoint (classifier or RetinaNet), or with ``detector="retinanet"`` a detector on a
    registered backbone. Returns ``(model in eval mode, info)``; info has ``kind`` (cls / det) and
    ``categories`` when known."""
    p = Path(target)
    if _is_checkpoint(p):
        from .engine.models import load_model

        model, state = load_model(p)
        spec = state.get("model", {})
        cats = spec.get("categories")
        if spec.get("task") == "det":
            return model.eval(), {"kind": "det", "categories": cats, "source": str(p)}
        if features_only:
            model.configure_outputs(features_only=True, out_strides=out_strides)
        return model.eval(), {"kind": "cls", "categories": cats, "source": str(p)}
    if p.suffix in (".safetensors", ".pt", ".pth", ".bin") or p.exists():
        raise ValueError(f"{p}: not a vertebra training checkpoint; to export backbone weights give the network "
                         f"name and --weights {p}")
    from .registry import create_backbone

    if detector:
        from .detection import create_detector

        kw = {} if min_size is None else {"min_size": min_size, "max_size": max(min_size, int(min_size * 1333 / 800))}
        model = create_detector(detector, backbone=target, num_classes=num_classes or 91, backbone_weights=weights,
                                **kw)
        return model.eval(), {"kind": "det", "categories": None, "source": target}
    model = create_backbone(target, num_classes=num_classes, features_only=features_only, out_strides=out_strides,
                            weights=weights)
    return model.eval(), {"kind": "cls", "categories": None, "source": target}


# -- the command ------------------------------------------------------------------------------------------------------
def register_commands(subparsers) -> None:
    """Add ``vertebra export`` to the CLI's sub-parsers."""
    sp = subparsers.add_parser(
        "export", help="export a backbone or a trained checkpoint to ONNX and/or torch.export (.pt2)",
        description="Export a registered backbone (classifier or --features-only), a trained checkpoint "
                    "(classifier or RetinaNet) or, with --detector retinanet, a RetinaNet on a backbone. "
                    "RetinaNet exports with decoding and NMS; a JSON sidecar describes its preprocessing.")
    sp.add_argument("target", help="a registered backbone name or a vertebra checkpoint (.safetensors)")
    sp.add_argument("--out", help="output path without or with suffix (default: ./<name>)")
    sp.add_argument("--format", default="onnx", choices=["onnx", "pt2", "both"])
    sp.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (17 or newer)")
    sp.add_argument("--input", type=int, help="square input size (backbones: default the paper's; RetinaNet: the "
                                              "canvas size, default its min_size rounded up to the pad multiple)")
    sp.add_argument("--batch", type=int, default=1, help="batch of the example input")
    sp.add_argument("--dynamic-batch", action="store_true", help="leave the batch axis dynamic")
    sp.add_argument("--dynamic-size", action="store_true", help="leave height and width dynamic (backbones)")
    sp.add_argument("--features-only", action="store_true", help="export the feature extractor")
    sp.add_argument("--out-strides", type=int, nargs="+", help="feature strides (with --features-only)")
    sp.add_argument("--num-classes", type=int, help="classes (default: the paper's; 91 for --detector)")
    sp.add_argument("--weights", help="backbone weights (vertebra, torchvision or timm state_dict)")
    sp.add_argument("--detector", choices=["retinanet"], help="export a detector on the named backbone")
    sp.add_argument("--check", action="store_true", help="run the export against PyTorch (onnxruntime / the "
                                                         "ExportedProgram); fail above the tolerance")
    sp.add_argument("--rtol", type=float, default=1e-4, help="--check: allowed difference relative to the "
                                                             "output scale (default 1e-4)")
    sp.add_argument("--atol", type=float, default=1e-5, help="--check: absolute allowance (default 1e-5)")
    sp.set_defaults(func=cmd_export)


def _print(msg: str) -> None:
    print(msg, flush=True)


def cmd_export(args) -> int:
    model, info = load_for_export(args.target, num_classes=args.num_classes, features_only=args.features_only,
                                  out_strides=args.out_strides, weights=args.weights, detector=args.detector)
    name = getattr(model, "name", Path(args.target).stem)
    base = Path(args.out) if args.out else Path(name)
    if base.suffix in (".onnx", ".pt2"):
        base = base.with_suffix("")
    formats = ["onnx", "pt2"] if args.format == "both" else [args.format]
    ok = True
    if info["kind"] == "det":
        d = int(model.transform.size_divisible)
        size = args.input or int(math.ceil(model.transform.min_size[-1] / d) * d)
        if size % d:
            raise ValueError(f"--input {size}: the RetinaNet canvas must be a multiple of {d}")
        if args.dynamic_size:
            raise ValueError("--dynamic-size: a RetinaNet export has a fixed canvas (its anchors are constants); "
                             "choose the canvas with --input")
        sidecar = retinanet_sidecar(model, size, info.get("categories"))
        batch, sizes, _ = sample_detection_batch(size, n=max(2, args.batch))
        for fmt in formats:
            t0 = time.perf_counter()
            path = base.with_suffix(f".{fmt}")
            if fmt == "onnx":
                data = export_retinanet_onnx(model, path, size, batch=args.batch, opset=args.opset,
                                             dynamic_batch=True)
                _print(f"wrote {path} ({len(data) / 1e6:.1f} MB, opset {args.opset}, canvas {size}x{size}, "
                       f"dynamic batch) in {time.perf_counter() - t0:.1f} s")
            else:
                export_retinanet_program(model, path, size, batch=args.batch)
                _print(f"wrote {path} (ExportedProgram, canvas {size}x{size}) in {time.perf_counter() - t0:.1f} s")
            if args.check:
                fn = check_retinanet_onnx if fmt == "onnx" else check_retinanet_program
                res = fn(model, path, batch, sizes, rtol=args.rtol, atol=max(args.atol, 1e-4))
                _print(f"check {fmt}: {res}")
                ok &= res.ok
        side = base.with_suffix(".json")
        write_atomic(side, json.dumps(sidecar, indent=1) + "\n")
        _print(f"wrote {side} (preprocessing: mean, std, canvas size, pad multiple, categories)")
        return 0 if ok else 1
    example = _example_input(model, args.input, args.batch)
    inputs = _sample_inputs(example, args.dynamic_batch, args.dynamic_size, getattr(model, "min_input_size", 1))
    spec = getattr(model, "spec", None)
    for fmt in formats:
        t0 = time.perf_counter()
        path = base.with_suffix(f".{fmt}")
        if fmt == "onnx":
            data = export_onnx(model, path, example, opset=args.opset, dynamic_batch=args.dynamic_batch,
                               dynamic_size=args.dynamic_size)
            _print(f"wrote {path} ({len(data) / 1e6:.1f} MB, opset {args.opset}, input {tuple(example.shape)}) "
                   f"in {time.perf_counter() - t0:.1f} s")
        else:
            export_program(model, path, example, dynamic_batch=args.dynamic_batch, dynamic_size=args.dynamic_size)
            _print(f"wrote {path} (ExportedProgram, input {tuple(example.shape)}) in {time.perf_counter() - t0:.1f} s")
        if args.check:
            fn = check_onnx if fmt == "onnx" else check_program
            res = fn(model, path, inputs, rtol=args.rtol, atol=args.atol)
            _print(f"check {fmt}: {res}")
            ok &= res.ok
    side = base.with_suffix(".json")
    meta = {"format": "vertebra-backbone-export", "version": 1, "name": name, "source": info["source"],
            "features_only": bool(getattr(model, "features_only", False)),
            "outputs": _output_names(model), "input": list(example.shape[1:]),
            "dynamic_batch": args.dynamic_batch, "dynamic_size": args.dynamic_size,
            "mean": [0.485, 0.456, 0.406] if spec is None or spec.dataset == "imagenet" else None,
            "std": [0.229, 0.224, 0.225] if spec is None or spec.dataset == "imagenet" else None,
            "num_classes": getattr(model, "num_classes", None), "categories": info.get("categories")}
    write_atomic(side, json.dumps(meta, indent=1) + "\n")
    return 0 if ok else 1
