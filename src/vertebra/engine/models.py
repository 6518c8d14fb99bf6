"""Rebuilding a trained model from a checkpoint (its :class:`~vertebra.engine.tasks.ModelSpec` and weights)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint
from .tasks import ModelSpec, task_for

__all__ = ["build_model", "load_model", "load_state"]


def build_model(spec: ModelSpec | dict[str, Any], backbone_weights: str | None = None) -> nn.Module:
    """A model from its description (a :class:`ModelSpec`, or a checkpoint's ``state["model"]`` dict)."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    try:
        task = task_for(spec.task)
    except ValueError as e:
        raise CheckpointError(f"unknown task {spec.task!r} in the model description") from e
    return task.build_model(spec, backbone_weights)


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: os.PathLike | str, spec: ModelSpec) -> None:
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
        raise CheckpointError(f"{path}: the weights do not fit the model it describes ({spec.describe()}): "
                              + "; ".join(parts))
    model.load_state_dict(tensors)


def load_model(path: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint, with its averaged (EMA) weights when it has them and ``ema``.

    Returns ``(model in eval mode, checkpoint state)``; the model description is ``state["model"]`` (the saved
    dict; ``ModelSpec.from_dict(state["model"])`` reads it).
    """
    ck = load_checkpoint(path, prefixes=("model", "ema"))
    try:
        spec = ModelSpec.from_dict(ck.model_spec)
    except TypeError as e:
        raise CheckpointError(f"{ck.path}: incomplete model description: {e}") from None
    try:
        model = build_model(spec)
    except CheckpointError as e:
        raise CheckpointError(f"{ck.path}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ck.path}: cannot rebuild the model it describes ({spec.describe()}): {e}") from None
    tensors = ck.tensors("ema") if ema and ck.tensors("ema") else ck.tensors("model")
    if not tensors:
        raise CheckpointError(f"{ck.path}: holds no model weights")
    load_state(model, tensors, ck.path, spec)
    return model.to(device).eval(), ck.state
