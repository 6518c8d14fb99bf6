"""Training recipes chosen for the user: a preset sets the TrainConfig fields that a recipe is made of, under
whatever the user gave.

``scratch``: RetinaNet from random init in a short budget (the recipe of ``benchmarks/shapes_retinanet.py``):
progressive resizing (half the size for the first 60 % of the schedule, three quarters until 80 %), an EMA of the
weights (decay 0.995 a step at batch 8, 0.990 at 16: the same window in images) is evaluated, a light RetinaNet
(FPN of 128 channels, head towers of 2 convs with GroupNorm, stable from scratch at a high learning rate, 100
detections per image), anchors fitted to the training boxes, batches of 16 images, AdamW (lr 2.5e-4 per image of
the batch: 4e-3 at 16, weight decay 0.05) with 150 warm-up steps then cosine, mixed precision where the device runs
it (bf16 on a CPU with bf16 convolutions, fp16 on CUDA) and channels_last. With a time budget the schedule and
the resizing run over the time, not the epochs. Batch 16 rather than 8: on a CPU a step at 128 px moves the
weights, their gradients, the optimizer's moments and the EMA once whatever the batch, so 16 images train faster
per image than 8 and reach a higher AP50 in the same time (``benchmarks/RESULTS.md``, shapes_retinanet).

``finetune``: the same detector and anchors on a backbone that starts from weights (frozen BatchNorm and the
first stages frozen come with the weights, :func:`~vertebra.engine.tasks.backbone_init`): batches of 8, AdamW at
lr 5e-4 (6.25e-5 per image), no progressive resizing (the weights' features are learnt at one scale).

A preset's learning rate and EMA decay are per image of the batch: with a batch given (``--batch``) the rate
follows it (the linear rule) and the decay keeps its window in images, unless ``--lr`` / ``--ema`` are given too.

``auto`` (what ``vertebra train`` uses) is ``finetune`` when the backbone starts from weights, else ``scratch``;
``none`` is the engine's plain defaults (SGD, the paper's detector), every field as given.

:func:`apply_preset` fills the fields the user did not set (``explicit``: the flags given; from Python, every
field that differs from TrainConfig's default counts as given) and records the preset's name and every value it
set in ``TrainConfig.preset`` / ``preset_values``, which config.json and every checkpoint keep. Applying it again
(a resumed run, ``train --config``) changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

from .config import TrainConfig

__all__ = ["PRESETS", "PRESET_NAMES", "apply_preset", "choose_preset", "explicit_fields", "describe_preset"]

#: the EMA's decay per image: 0.995 a step at batch 8 (measured on the shapes set), 0.990 at 16
_EMA_PER_IMAGE = 0.995 ** (1 / 8)
#: the recipe of each preset: TrainConfig fields, ``lr_per_image`` (the learning rate is that times the batch),
#: ``ema_per_image`` (the EMA's decay per step is that to the power of the batch),
#: ``detector_kwargs`` merged under the user's, ``progressive`` as (fraction of the size, until) pairs, ``on_time``:
#: with max_minutes the schedule runs over the time budget
PRESETS: dict[str, dict[str, Any]] = {
    "scratch": {
        "fields": {"optimizer": "adamw", "batch": 16, "weight_decay": 0.05, "warmup_steps": 150,
                   "schedule": "cosine", "amp": "auto", "channels_last": True, "augment": "flip"},
        "lr_per_image": 2.5e-4,
        "ema_per_image": _EMA_PER_IMAGE,
        "detector_kwargs": {"fpn_channels": 128, "head_convs": 2, "head_norm": "gn", "detections_per_img": 100,
                            "anchor_fit": True},
        "progressive": [(0.5, 0.6), (0.75, 0.8)],
        "on_time": True,
    },
    "finetune": {
        "fields": {"optimizer": "adamw", "batch": 8, "weight_decay": 0.05, "warmup_steps": 150, "schedule": "cosine",
                   "amp": "auto", "channels_last": True, "augment": "flip"},
        "lr_per_image": 6.25e-5,
        "ema_per_image": _EMA_PER_IMAGE,
        "detector_kwargs": {"fpn_channels": 128, "head_convs": 2, "head_norm": "gn", "detections_per_img": 100,
                            "anchor_fit": True},
        "progressive": [],
        "on_time": True,
    },
}
PRESET_NAMES = ("auto", *PRESETS, "none")
#: a run with a time budget and no --epochs runs until the budget: the epochs are not what stops it
_EPOCHS_ON_TIME = 10_000


def explicit_fields(cfg: TrainConfig) -> set[str]:
    """The fields of ``cfg`` that differ from TrainConfig's defaults (what a Python caller set)."""
    base = TrainConfig()
    return {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(base, f.name)}


def choose_preset(cfg: TrainConfig) -> str:
    """``cfg.preset`` with ``auto`` resolved: ``finetune`` when the backbone starts from weights (``pretrained`` or
    ``backbone_weights``), else ``scratch``; classification runs have no preset (``none``)."""
    name = cfg.preset
    if name not in PRESET_NAMES:
        raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}, got {name!r}")
    if name != "auto":
        return name
    if cfg.task != "det":
        return "none"
    return "finetune" if (cfg.pretrained is not None or cfg.backbone_weights is not None) else "scratch"


def _size(cfg: TrainConfig) -> int:
    if cfg.size is not None:
        return int(cfg.size)
    from .tasks import task_for

    return int(task_for(cfg.task).default_size(cfg.source))


def _min_input(cfg: TrainConfig) -> int:
    import torch

    from ..registry import create_backbone

    try:
        with torch.device("meta"):
            return int(create_backbone(cfg.backbone, features_only=True, **cfg.backbone_kwargs).min_input_size)
    except Exception:  # noqa: BLE001 - a bad backbone is reported when the model is built
        return 32


def _progressive(pairs, size: int, min_input: int) -> list[list[float]]:
    out: list[list[float]] = []
    for frac, until in pairs:
        s = max(min_input, int(round(size * frac / 32)) * 32)
        if s < size and (not out or s > out[-1][0]):
            out.append([s, until])
    return out


def apply_preset(cfg: TrainConfig, explicit: Collection[str] | None = None) -> TrainConfig:
    """``cfg`` with its preset's values in every field not in ``explicit`` (None: :func:`explicit_fields`);
    ``detector_kwargs`` merged key by key (the user's keys win). Records ``preset`` (the chosen name) and
    ``preset_values`` (each value set). A config whose preset is applied already is returned as it is."""
    if cfg.preset_values:
        return cfg
    name = choose_preset(cfg)
    if name == "none":
        return dataclasses.replace(cfg, preset="none")
    explicit = explicit_fields(cfg) if explicit is None else set(explicit)
    recipe = PRESETS[name]
    values: dict[str, Any] = {}
    for k, v in recipe["fields"].items():
        if k in explicit:
            continue
        if k == "amp":
            from ..precision import resolve_amp

            v = resolve_amp(v, cfg.device)
        values[k] = v
    batch = int(values.get("batch", cfg.batch))  # the preset's or the one given
    if "lr" not in explicit:  # per image of the batch
        values["lr"] = recipe["lr_per_image"] * batch
    if "ema" not in explicit:  # the same averaging window in images whatever the batch
        values["ema"] = round(recipe["ema_per_image"] ** batch, 6)
    if recipe["progressive"] and "progressive" not in explicit:
        prog = _progressive(recipe["progressive"], _size(cfg), _min_input(cfg))
        if prog:
            values["progressive"] = prog
    if recipe["on_time"] and cfg.max_minutes is not None:
        if "schedule_on_time" not in explicit:
            values["schedule_on_time"] = True
        if "epochs" not in explicit:
            values["epochs"] = _EPOCHS_ON_TIME
    det = {k: v for k, v in recipe["detector_kwargs"].items() if k not in cfg.detector_kwargs}
    if any(k in cfg.detector_kwargs for k in ("anchor_sizes", "max_level")):
        det.pop("anchor_fit", None)  # anchors given by hand: not fitted
    if det:
        values["detector_kwargs"] = {**det, **cfg.detector_kwargs}
    record = {k: v for k, v in values.items() if k != "detector_kwargs"}
    if det:
        record["detector_kwargs"] = det
    return dataclasses.replace(cfg, **values, preset=name, preset_values=record)


def describe_preset(cfg: TrainConfig) -> str:
    """One line: the preset and what it set (``preset scratch: optimizer adamw, lr 0.002, ...``)."""
    if not cfg.preset_values:
        return f"preset {cfg.preset}: the engine's defaults and the flags given"
    parts = []
    for k, v in cfg.preset_values.items():
        if k == "detector_kwargs":
            parts.extend(f"{dk} {dv}" for dk, dv in v.items())
        elif k == "amp":
            parts.append(f"precision {v or 'fp32'}")
        elif k == "progressive":
            parts.append("progressive " + ",".join(f"{int(s)}:{u:g}" for s, u in v))
        else:
            parts.append(f"{k} {v}")
    return f"preset {cfg.preset} (any flag overrides): " + ", ".join(parts)
