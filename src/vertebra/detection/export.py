"""RetinaNet export: one graph from the normalised, padded canvas to the detections.

See ``vertebra.export`` for the tensors of the graph. The postprocessing is ``Postprocess`` in its
``exportable`` mode (``postprocess.py``): the same algorithm as the eager detector.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import IMAGENET_MEAN, IMAGENET_STD
from .postprocess import Postprocess

__all__ = ["RetinaNetExport", "check_retinanet_onnx", "check_retinanet_program", "compare_detections",
           "export_retinanet_onnx", "export_retinanet_program", "preprocess_for_export", "reference_detections",
           "retinanet_sidecar", "sample_detection_batch"]

DEFAULT_OPSET = 17


def preprocess_for_export(images, size: int, mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD, pad_multiple: int = 32
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


class RetinaNetExport(nn.Module):
    """A RetinaNet as one exportable graph: ``(images, image_sizes) -> (boxes, scores, labels, batch_index)``.

    See the module docstring for the tensors. ``images`` is the normalised, padded canvas of
    :func:`preprocess_for_export`; the anchors are computed for ``canvas`` (H, W) at construction.
    """

    def __init__(self, model, canvas: tuple[int, int]) -> None:
        super().__init__()
        self.net = model.net
        post = model.postprocess
        self.num_classes = int(model.num_classes)
        self.postprocess = Postprocess(post.score_thresh, post.nms_thresh, post.detections_per_img,
                                       post.topk_candidates, exportable=True)
        self.canvas = tuple(int(v) for v in canvas)
        with torch.no_grad():
            probe = torch.zeros(1, self.net.backbone.in_chans, *self.canvas)
            levels = self.net.pyramid(probe)
        sizes = [tuple(int(s) for s in f.shape[-2:]) for f in levels]
        anchors = model.anchor_generator(self.canvas, sizes, dtype=torch.float32)
        a = model.anchor_generator.num_anchors_per_location()
        self.per_level = [h * w * n for (h, w), n in zip(sizes, a)]
        self.register_buffer("anchors", anchors.clone(), persistent=False)

    def forward(self, images: Tensor, image_sizes: Tensor):
        cls_logits, bbox_regression = self.net(images)
        return self.postprocess(cls_logits, bbox_regression, self.anchors, self.per_level, image_sizes)


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
    from ..export.backbone import write_onnx

    return write_onnx(wrapper, (images, sizes), out, model=model, opset_version=opset,
                      input_names=["images", "image_sizes"],
                      output_names=["boxes", "scores", "labels", "batch_index"], dynamic_axes=dyn)


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
        from ..export.backbone import save_program

        save_program(ep, out)
    return ep


def reference_detections(model, batch: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
    """PyTorch's detections (the eager ``Postprocess``) of a preprocessed canvas batch, in canvas pixels."""
    sizes = [tuple(int(v) for v in s) for s in image_sizes.tolist()]
    model.eval()
    with torch.no_grad():
        levels = model.net.pyramid(batch)
        cls_logits, bbox_regression = model.net.head(levels)
        anchors, per_level = model.anchors_for(batch, levels)
        return model.postprocess(cls_logits.float(), bbox_regression.float(), anchors, per_level, sizes)


def compare_detections(refs: list[dict[str, Tensor]], boxes, scores, labels, batch_index, *,
                       rtol: float = 1e-4, atol: float = 1e-4):
    """Detections of an export against PyTorch's: same count and labels per image, boxes and scores close."""
    import numpy as np

    from ..export.backbone import ExportCheck

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


def check_retinanet_onnx(model, onnx_model, batch: Tensor, image_sizes: Tensor, **tol):
    from ..export.backbone import _ort_session

    sess = _ort_session(onnx_model)
    out = sess.run(None, {"images": batch.numpy(), "image_sizes": image_sizes.numpy()})
    return compare_detections(reference_detections(model, batch, image_sizes), *out, **tol)


def check_retinanet_program(model, program, batch: Tensor, image_sizes: Tensor, **tol):
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
