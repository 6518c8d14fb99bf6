"""Building the model a run trains, and rebuilding it from a checkpoint's model description."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint

__all__ = ["build_model", "load_model", "IMAGENET_MEAN", "IMAGENET_STD", "describe"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def describe(spec: dict[str, Any]) -> str:
    what = "RetinaNet" if spec.get("task") == "det" else "classifier"
    return f"{what} on {spec.get('backbone')} with {spec.get('num_classes')} classes"


def default_detector_kwargs(size: int, pretrained: bool, n_stages: int | None = None) -> dict[str, Any]:
    """The engine's RetinaNet defaults at a training size: resize to ``size``; from random init train
    every stage with live BatchNorm (frozen BN is for pretrained backbones)."""
    kw: dict[str, Any] = {"min_size": int(size), "max_size": int(math.ceil(size * 1333 / 800))}
    if not pretrained:
        kw["frozen_bn"] = False
        if n_stages is not None:
            kw["trainable_stages"] = n_stages
    return kw


def build_model(spec: dict[str, Any], backbone_weights: str | None = None) -> nn.Module:
    """A model from its description (``state["model"]`` of a checkpoint)."""
    task = spec.get("task")
    if task == "det":
        from ..detection import create_detector
        from ..detection.retinanet import RetinaNetHead

        kw = dict(spec.get("detector_kwargs") or {})
        if spec.get("backbone_kwargs"):
            kw["backbone_kwargs"] = dict(spec["backbone_kwargs"])
        if backbone_weights is not None:
            kw["backbone_weights"] = backbone_weights
        model = create_detector(spec.get("detector", "retinanet"), backbone=spec["backbone"],
                                num_classes=int(spec["num_classes"]), **kw)
        n = spec.get("head_convs")
        if n is not None and n != 4:
            old = model.net.head
            norm = kw.get("head_norm")
            model.net.head = RetinaNetHead(old.cls_logits.in_channels, old.num_anchors, old.num_classes,
                                           num_convs=int(n), norm=norm)
        return model
    if task == "cls":
        from ..registry import create_backbone

        return create_backbone(spec["backbone"], num_classes=int(spec["num_classes"]), weights=backbone_weights,
                               **dict(spec.get("backbone_kwargs") or {}))
    raise CheckpointError(f"unknown task {task!r} in the model description")


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: os.PathLike | str, spec: dict) -> None:
    """``model.load_state_dict(tensors)`` with an error naming the checkpoint when they do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shape = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} of another shape (e.g. {k}: {tuple(tensors[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the model)")
        raise CheckpointError(f"{path}: the weights do not fit the model it describes ({describe(spec)}): "
                              + "; ".join(parts))
    model.load_state_dict(tensors)


def load_model(path: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint, with its averaged (EMA) weights when it has them and ``ema``.

    Returns ``(model in eval mode, checkpoint state)``; the model description is ``state["model"]``.
    """
    ck = load_checkpoint(path, prefixes=("model", "ema"))
    spec = ck.model_spec
    try:
        model = build_model(spec)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ck.path}: cannot rebuild the model it describes ({describe(spec)}): {e}") from None
    tensors = ck.tensors("ema") if ema and ck.tensors("ema") else ck.tensors("model")
    if not tensors:
        raise CheckpointError(f"{ck.path}: holds no model weights")
    load_state(model, tensors, ck.path, spec)
    return model.to(device).eval(), ck.state
