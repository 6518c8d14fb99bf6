"""Optimisation: parameter groups, the optimizers (SGD, AdamW, RMSProp as TensorFlow computes it), the
learning-rate schedules (warm-up, then cosine, step decay, the Inception rule or constant), progressive
resizing, and the batch plan (how a global batch is split over processes and micro-batches)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["BatchPlan", "RMSpropTF", "param_groups", "build_optimizer", "schedule_fraction", "lr_factor",
           "progressive_size", "INCEPTION_LR_DECAY", "INCEPTION_EPOCHS_PER_DECAY"]

#: Inception-v3 (Rethinking the Inception Architecture, Sec. 8): lr x0.94 every two epochs
INCEPTION_LR_DECAY = 0.94
INCEPTION_EPOCHS_PER_DECAY = 2


# --------------------------------------------------------------------------------------------- batch plan


@dataclass(frozen=True)
class BatchPlan:
    """How a run's optimizer steps are made: ``global_batch = batch x world_size x accum_steps`` images, and
    the base learning rate ``lr`` for them (``lr_scale="linear"``: ``resolved_lr x global_batch /
    lr_ref_batch``). Computed from the config and the number of processes, never written into the config."""

    world_size: int
    batch: int  # per process and micro-batch
    accum_steps: int
    global_batch: int
    lr_ref_batch: int | None
    lr: float
    notes: tuple[str, ...] = ()

    @classmethod
    def for_run(cls, cfg: TrainConfig, world_size: int, resumed_global_batch: int | None = None,
                resumed_world_size: int | None = None) -> BatchPlan:
        """A fresh run: ``cfg.batch x world_size x cfg.accum_steps``. A resumed one keeps its global batch (what an
        optimizer step computes) and splits it over this run's processes: ``accum_steps`` is recomputed for the
        same per-process ``batch``, else ``batch`` for the same ``accum_steps``, else ``batch`` with no
        accumulation."""
        w = int(world_size)
        batch, accum, notes = cfg.batch, cfg.accum_steps, []
        if resumed_global_batch is None:
            g = batch * w * accum
            if cfg.sync_bn and w == 1:
                raise ValueError("--sync-bn needs several processes (torchrun --nproc_per_node N -m vertebra train "
                                 "...); in one process BatchNorm already sees the whole batch")
        else:
            g = int(resumed_global_batch)
            before = (batch, accum, resumed_world_size or 1)
            if g % (batch * w) == 0:
                accum = g // (batch * w)
            elif g % (w * accum) == 0:
                batch = g // (w * accum)
            elif g % w == 0:
                batch, accum = g // w, 1
            else:
                raise ValueError(f"the checkpoint's global batch of {g} images per optimizer step cannot be split "
                                 f"over {w} processes; resume on a number of processes that divides {g}")
            if (batch, accum, w) != before:
                notes.append(f"resuming on {w} process(es) (the checkpoint ran on {before[2]}): the global "
                             f"batch stays {g} = --batch {batch} x {w} x --accum-steps {accum}")
            if cfg.sync_bn and w == 1:
                notes.append("sync_bn has no effect in one process (BatchNorm sees the whole batch)")
        ref = None
        lr = cfg.resolved_lr()
        if cfg.lr_scale == "linear":
            # the batch the given lr is meant for, fixed for the run
            ref = cfg.batch if cfg.lr_ref_batch is None else cfg.lr_ref_batch
            lr *= g / float(ref)
        return cls(w, batch, accum, g, ref if ref is not None else cfg.lr_ref_batch, lr, tuple(notes))

    def to_dict(self) -> dict[str, Any]:
        """What config.json records besides the config: the processes, the global batch and the scaled lr."""
        d = {"world_size": self.world_size, "global_batch": self.global_batch, "scaled_lr": self.lr}
        if self.lr_ref_batch is not None:
            d["lr_ref_batch"] = self.lr_ref_batch
        return d


# --------------------------------------------------------------------------------------------- optimizers


class RMSpropTF(torch.optim.RMSprop):
    """RMSProp with TensorFlow's update (the one the Inception papers trained with).

    ``ms = alpha * ms + (1 - alpha) * g^2`` (ms starts at 1, not 0);
    ``mom = momentum * mom + lr * g / sqrt(ms + eps)``; ``p -= mom``.
    ``weight_decay`` adds ``wd * p`` to the gradient. ``centered`` is not supported.

    PyTorch's RMSprop adds eps *outside* the square root, ``g / (sqrt(v) + eps)``; with Inception-v3's
    eps = 1.0 (Sec. 8: "RMSProp with decay of 0.9 and eps = 1.0") the difference matters.
    """

    def __init__(self, params, lr: float = 0.045, alpha: float = 0.9, eps: float = 1.0, weight_decay: float = 0.0,
                 momentum: float = 0.9):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps, wd, mom = group["lr"], group["alpha"], group["eps"], group["weight_decay"], \
                group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                if wd:
                    g = g.add(p, alpha=wd)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    if mom > 0:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                ms = state["square_avg"]
                ms.mul_(alpha).addcmul_(g, g, value=1 - alpha)
                update = g / ms.add(eps).sqrt_()
                if mom > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(mom).add_(update, alpha=lr)
                    p.sub_(buf)
                else:
                    p.sub_(update, alpha=lr)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the weights (ndim >= 2) only, not on biases and normalisation parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``model`` at base learning rate ``lr``."""
    groups = param_groups(model, cfg.resolved_weight_decay())
    # fused kernels (one pass over every parameter, CPU and CUDA): AdamW's step is ~5x faster than the loop
    fused = {"fused": True} if all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                   for g in groups for p in g["params"]) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fused)
    # RMSProp as Inception-v3 trained (TensorFlow's update; decay 0.9, eps 1.0, momentum 0.9)
    return RMSpropTF(groups, lr=lr, alpha=0.9, eps=1.0, momentum=cfg.momentum)


# --------------------------------------------------------------------------------------------- schedules


def schedule_fraction(done: float, total: float, start: float = 0.0) -> float:
    """How far through a schedule that runs from ``start`` to ``total`` (steps or seconds) ``done`` is, in
    [0, 1]. Progressive resizing uses the whole run (``start=0``), the cosine learning rate the part after the
    warm-up."""
    return min(1.0, max(0.0, (done - start) / max(total - start, 1e-9)))


def _step_decay(epoch: float, cfg: TrainConfig) -> float:
    milestones = cfg.step_epochs or (int(cfg.epochs * 2 / 3), int(cfg.epochs * 8 / 9))
    return cfg.step_gamma ** sum(1 for e in milestones if epoch >= e)


def _inception_decay(epoch: float, cfg: TrainConfig) -> float:
    return INCEPTION_LR_DECAY ** math.floor(epoch / INCEPTION_EPOCHS_PER_DECAY)


#: the epoch-based schedules: factor of the base learning rate at a (fractional) epoch
STEP_RULES = {"step": _step_decay, "inception": _inception_decay}


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int, total_steps: int, warmup: int,
              time_fraction: float | None = None) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up from ``warmup_factor``
    over ``warmup`` steps, then ``cfg.resolved_schedule()``: cosine to ``min_lr_ratio``, step decay, the
    Inception rule, or constant. ``time_fraction`` (the part of a time budget used after the warm-up)
    replaces the step position in the cosine when given."""
    if warmup > 0 and step < warmup:
        a = step / warmup
        return cfg.warmup_factor * (1 - a) + a
    schedule = cfg.resolved_schedule()
    if schedule == "cosine":
        t = schedule_fraction(step, total_steps, warmup) if time_fraction is None else time_fraction
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule in STEP_RULES:
        return STEP_RULES[schedule](step / max(1, steps_per_epoch), cfg)
    return 1.0


def progressive_size(progressive, fraction: float, size: int) -> int | None:
    """The training input size at ``fraction`` (0..1) of the schedule under ``progressive`` (``[[size, until],
    ...]``, see :class:`TrainConfig`); None when it is the run's own ``size``."""
    for sz, until in progressive:
        if fraction < until:
            return None if int(sz) == int(size) else int(sz)
    return None
