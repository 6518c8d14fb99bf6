"""The training configuration: the inputs of a run, saved as ``config.json`` in the run folder and inside
every checkpoint, so that a run can be resumed and a checkpoint rebuilt from it alone. What the Trainer
derives from it (processes, images per optimizer step, the scaled learning rate) is a
:class:`~vertebra.engine.optim.BatchPlan`, not written back here."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.sources import DataSource

__all__ = ["TrainConfig", "DataSource"]

#: written by earlier versions as config fields; now derived (BatchPlan) and dropped when a config is read
_DERIVED = ("world_size", "global_batch", "scaled_lr")
_OPTIMIZERS = ("sgd", "adamw", "rmsprop")
_SCHEDULES = ("cosine", "step", "inception", "constant")
#: (field, smallest value, None allowed): what validate() checks besides the choices
_AT_LEAST = (("epochs", 1, False), ("batch", 1, False), ("size", 16, True), ("workers", 0, False),
             ("warmup_steps", 0, True), ("weight_decay", 0.0, True), ("aux_weight", 0.0, True), ("max_steps", 1, True),
             ("eval_every", 1, False), ("save_every", 1, True), ("log_every", 1, False), ("threads", 1, True),
             ("accum_steps", 1, False), ("lr_ref_batch", 1, True), ("val_limit", 1, True))
#: fields that are None or a number > 0
_ABOVE_ZERO = ("lr", "clip", "max_minutes", "eval_every_minutes", "dist_timeout")


@dataclass
class TrainConfig:
    """Everything a run needs. ``task``: ``"det"`` (RetinaNet) or ``"cls"`` (a backbone as classifier), see
    :mod:`vertebra.engine.tasks`; ``source``: where the data is (:class:`~vertebra.data.sources.DataSource`;
    the default, no location, is the built-in shapes set)."""

    task: str = "det"
    source: DataSource = field(default_factory=DataSource)
    # the recipe (engine/presets.py): "auto" (scratch or finetune by how the backbone starts), "scratch",
    # "finetune" or "none"; preset_values: what it set (filled by apply_preset, kept in config.json)
    preset: str = "none"
    preset_values: dict[str, Any] = field(default_factory=dict)
    skip_bad: bool = False
    workers: int = 0
    size: int | None = None  # None: the task's default (256 for detection, 224 for folders, 32 for CIFAR)
    augment: str = "flip"  # "none" | "flip" | "full" (flip + colour jitter)
    # model
    backbone: str = "resnet18"
    backbone_weights: str | None = None  # a file or URL of backbone weights (ours, torchvision's, timm's)
    pretrained: str | None = None  # published backbone weights: "default" (the network's best) or a tag
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    detector_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. head_convs, fpn_channels, head_norm
    channels_last: bool = False
    # optimisation
    epochs: int = 12
    batch: int = 8
    lr: float | None = None  # None: 0.01 for SGD, 1e-3 for AdamW, 0.045 * batch / 32 for RMSProp
    optimizer: str = "sgd"  # "sgd" | "adamw" | "rmsprop"
    momentum: float = 0.9
    weight_decay: float | None = None  # None: 1e-4 (SGD), 0.05 (AdamW), 4e-5 (RMSProp)
    # "cosine" | "step" | "inception" (x0.94 every two epochs) | "constant"; "step" with RMSProp and no
    # step_epochs is the Inception rule
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None: min(500, a tenth of the run's steps); on time: at most a tenth of it
    warmup_factor: float = 0.001
    step_epochs: list[int] = field(default_factory=list)  # step schedule: multiply by step_gamma at these epochs
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.0
    schedule_on_time: bool = False  # with max_minutes: the schedule runs over the time budget, not the epochs
    # progressive resizing: [[size, until], ...] trains at `size` until the fraction `until` of the schedule
    # (of the time budget with schedule_on_time, else of the steps), then at the next size; after the last
    # pair at `size`. E.g. [[128, 0.5], [192, 0.75]]: half the run at 128 px, a quarter at 192, the rest at 256.
    progressive: list[list[float]] = field(default_factory=list)
    clip: float | None = None
    amp: str | None = None  # None | "bf16" | "fp16"
    ema: float | None = None  # decay, e.g. 0.9998
    label_smoothing: float = 0.0
    aux_weight: float | None = None  # auxiliary classifiers (None: the network's paper, GoogLeNet 0.3, v3 0.4)
    # run
    out: str | None = None  # run folder, default runs/<name>
    name: str | None = None
    exist_ok: bool = False  # write into a folder that holds a run (else the default one gets -2, -3 ...; out refuses)
    device: str = "cpu"
    seed: int = 0
    eval_every: int = 1  # epochs
    eval_every_minutes: float | None = None  # also evaluate after this much training time
    val_limit: int | None = None  # evaluate on the first N validation images (None: all)
    final_eval: bool = True  # a run stopped by max_minutes / max_steps / Ctrl-C evaluates once before it ends
    save_every: int | None = None  # steps (a checkpoint every N steps in addition to each epoch's end)
    log_every: int = 10  # steps between metrics.csv rows
    max_minutes: float | None = None
    max_steps: int | None = None
    progress: bool = True
    threads: int | None = None
    # several processes / machines (torchrun): see vertebra.engine.distributed
    accum_steps: int = 1  # micro-batches of `batch` per optimizer step (gradient accumulation)
    sync_bn: bool = False  # BatchNorm statistics over every process's batch
    lr_scale: str = "none"  # "none" | "linear": lr x global_batch / lr_ref_batch (Goyal et al. 2017)
    lr_ref_batch: int | None = None  # the batch `lr` is meant for (None: `batch`, one process, no accumulation)
    dist_backend: str | None = None  # None: gloo on CPU, nccl on CUDA
    dist_timeout: float = 30.0  # minutes any collective may wait for a peer before the job stops

    def __post_init__(self) -> None:
        if isinstance(self.source, dict):
            self.source = DataSource.from_dict(self.source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From :meth:`to_dict`'s output, or a config written by an earlier version (flat source fields, a
        top-level ``head_convs``, the derived world_size / global_batch / scaled_lr)."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        source_names = {f.name for f in dataclasses.fields(DataSource)}
        flat = {k: d.pop(k) for k in list(d) if k in source_names}
        if "source" not in d:
            d["source"] = DataSource.from_dict(flat)
        head_convs = d.pop("head_convs", None)
        if head_convs is not None:
            d["detector_kwargs"] = {"head_convs": head_convs, **(d.get("detector_kwargs") or {})}
        for k in _DERIVED:
            d.pop(k, None)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def validate(self) -> None:
        from .presets import PRESET_NAMES

        if self.preset not in PRESET_NAMES:
            raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}, got {self.preset!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be sgd, adamw or rmsprop, got {self.optimizer!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(_SCHEDULES)}, got {self.schedule!r}")
        if self.pretrained is not None and self.backbone_weights is not None:
            raise ValueError("give --pretrained (published weights) or --backbone-weights (a file), not both")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.augment not in ("none", "flip", "full"):
            raise ValueError(f"augment must be none, flip or full, got {self.augment!r}")
        for name, lo, optional in _AT_LEAST:
            v = getattr(self, name)
            if v is None and optional:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v < lo:
                raise ValueError(f"{name} must be {'an integer' if isinstance(lo, int) else 'a number'} >= {lo}"
                                 f"{' (or None)' if optional else ''}, got {v!r}")
        for name in _ABOVE_ZERO:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
                raise ValueError(f"{name} must be a number > 0 (or None), got {v!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if any(e < 1 for e in self.step_epochs):
            raise ValueError(f"step_epochs must be epochs >= 1, got {self.step_epochs}")
        if self.schedule_on_time and self.max_minutes is None:
            raise ValueError("schedule_on_time runs the schedule over the time budget: give max_minutes too")
        last = 0.0
        for i, pair in enumerate(self.progressive):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"progressive[{i}] must be a (size, until) pair, got {pair!r}")
            sz, until = pair
            if int(sz) != sz or sz < 16:
                raise ValueError(f"progressive[{i}]: size must be an integer >= 16, got {sz!r}")
            if not last < until <= 1.0:
                raise ValueError(f"progressive[{i}]: until must increase within (0, 1], got {until!r} after {last}")
            last = until
        if self.lr_scale not in ("none", "linear"):
            raise ValueError(f"lr_scale must be 'none' or 'linear', got {self.lr_scale!r}")
        if self.dist_backend not in (None, "gloo", "nccl"):
            raise ValueError(f"dist_backend must be gloo or nccl, got {self.dist_backend!r}")
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        from .tasks import task_for

        task_for(self.task).check_source(self.source)

    def resolved_schedule(self) -> str:
        """The schedule's name: ``"step"`` with RMSProp and no ``step_epochs`` is Inception-v3's rule."""
        if self.schedule == "step" and not self.step_epochs and self.optimizer == "rmsprop":
            return "inception"
        return self.schedule

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return {"sgd": 0.01, "adamw": 1e-3, "rmsprop": 0.045 * self.batch / 32}[self.optimizer]

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return {"sgd": 1e-4, "adamw": 0.05, "rmsprop": 4e-5}[self.optimizer]

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / (self.name or f"{self.task}_{self.backbone}")
