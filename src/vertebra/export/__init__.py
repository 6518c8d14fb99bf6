"""Deployment: ONNX and ``torch.export`` of backbones (:mod:`vertebra.export.backbone`) and of RetinaNet
(:mod:`vertebra.detection.export`), each with a numerical check, and :func:`load_for_export`, which finds the
model to export (a registered name, a trained checkpoint or a RetinaNet on a backbone).

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

Its postprocessing is ``detection.Postprocess`` in its exportable mode (the eager detector's algorithm with
static shapes): per image and pyramid level the ``topk_candidates`` best (anchor, class) scores, decoded and
clipped to the image, class-wise NMS (ONNX ``NonMaxSuppression`` with the batch and class axes) keeping scores
above ``score_thresh``, and the ``detections_per_img`` best per image. The anchors are constants of the graph:
the canvas size S is fixed at export (the batch may be dynamic). A JSON sidecar (``<out>.json``) records mean,
std, canvas size, pad multiple, categories and thresholds; :func:`preprocess_for_export` is the preprocessing
step, in ~20 lines so that it can be ported to any runtime. The ``.pt2`` of a RetinaNet holds the same graph
(``torchvision::nms`` in place of ONNX's operator).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..detection.export import (
    RetinaNetExport,
    check_retinanet_onnx,
    check_retinanet_program,
    compare_detections,
    export_retinanet_onnx,
    export_retinanet_program,
    preprocess_for_export,
    reference_detections,
    retinanet_sidecar,
    sample_detection_batch,
)
from .backbone import (
    DEFAULT_OPSET,
    ExportCheck,
    check_onnx,
    check_program,
    example_input,
    export_onnx,
    export_program,
    onnx_friendly,
    output_names,
    sample_inputs,
    save_program,
)

__all__ = [
    "DEFAULT_OPSET",
    "ExportCheck",
    "RetinaNetExport",
    "check_onnx",
    "check_program",
    "check_retinanet_onnx",
    "check_retinanet_program",
    "checkpoint_normalization",
    "compare_detections",
    "example_input",
    "export_onnx",
    "export_program",
    "export_retinanet_onnx",
    "export_retinanet_program",
    "load_for_export",
    "onnx_friendly",
    "output_names",
    "preprocess_for_export",
    "reference_detections",
    "retinanet_sidecar",
    "sample_detection_batch",
    "sample_inputs",
    "save_program",
]


def _is_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "vertebra-checkpoint"
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a checkpoint
        return False


def checkpoint_normalization(spec, model: nn.Module | None = None) -> tuple[list[float] | None, list[float] | None]:
    """The input mean / std a checkpoint's model was trained with: a classifier's recorded ``spec.mean`` /
    ``spec.std``, or, for a checkpoint that does not record them, the normalisation the classification task
    trains ``spec.backbone`` with (:meth:`~vertebra.engine.tasks.ClassificationTask.normalization`: its training
    set's, e.g. CIFAR-10's for resnet110_sd); a RetinaNet's, its preprocessing's ``image_mean`` / ``image_std``."""
    if spec.mean is not None and spec.std is not None:
        return [float(v) for v in spec.mean], [float(v) for v in spec.std]
    transform = getattr(model, "transform", None)
    if spec.task == "det" and transform is not None and hasattr(transform, "image_mean"):
        return ([float(v) for v in transform.image_mean.flatten()], [float(v) for v in transform.image_std.flatten()])
    if spec.task == "cls":
        from ..engine.tasks import ClassificationTask

        return ClassificationTask.normalization(spec.backbone)
    return None, None


def load_for_export(target: str, *, num_classes: int | None = None, features_only: bool = False,
                    out_strides=None, weights: str | None = None, detector: str | None = None,
                    min_size: int | None = None, pretrained=None) -> tuple[nn.Module, dict[str, Any]]:
    """The model to export: a registered backbone name (optionally with ``weights`` or ``pretrained``), a trained
    engine checkpoint (classifier or RetinaNet), or with ``detector="retinanet"`` a detector on a
    registered backbone. Returns ``(model in eval mode, info)``; info has ``source`` and, for a checkpoint,
    the ``categories`` and the ``mean`` / ``std`` it was trained with (for published weights, theirs)."""
    p = Path(target)
    if _is_checkpoint(p):
        from ..detection.retinanet import RetinaNet
        from ..engine import load_model
        from ..engine.tasks import ModelSpec

        model, state = load_model(p)
        spec = ModelSpec.from_dict(state.get("model", {}))
        mean, std = checkpoint_normalization(spec, model)
        info = {"categories": spec.categories, "source": str(p), "mean": mean, "std": std}
        if features_only and not isinstance(model, RetinaNet):
            model.configure_outputs(features_only=True, out_strides=out_strides)
        return model.eval(), info
    if p.suffix in (".safetensors", ".pt", ".pth", ".bin") or p.exists():
        raise ValueError(f"{p}: not a vertebra training checkpoint; to export backbone weights give the network "
                         f"name and --weights {p}")
    if detector:
        from ..detection import create_detector

        kw = {} if min_size is None else {"min_size": min_size, "max_size": max(min_size, int(min_size * 1333 / 800))}
        model = create_detector(detector, backbone=target, num_classes=num_classes or 91, backbone_weights=weights,
                                backbone_pretrained=pretrained, **kw)
        return model.eval(), {"categories": None, "source": target}
    from ..registry import create_backbone

    model = create_backbone(target, num_classes=num_classes, features_only=features_only, out_strides=out_strides,
                            weights=weights, pretrained=pretrained)
    info = {"categories": None, "source": target}
    w = getattr(model, "pretrained_weights", None)
    if w is not None:
        info.update(mean=list(w.mean), std=list(w.std), source=f"{target} {w.tag}")
        if not features_only and model.num_classes == w.num_classes:
            from ..hub import category_names

            info["categories"] = category_names(w)
    return model.eval(), info
