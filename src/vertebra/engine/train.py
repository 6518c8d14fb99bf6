"""The training loop: ``Trainer(TrainConfig(...)).fit()`` trains a task (:mod:`.tasks`) and writes a run folder::

    runs/<name>/.lock            held while the run lives (a second run on the folder refuses to start)
                config.json      the config, the batch plan, how the backbone starts ("init") and what the data
                                 gave ("data": images, boxes, boxes clipped, annotations skipped, per split)
                metrics.csv      one row per log interval (loss, parts, lr, images/s) and per evaluation
                loss.png         loss (and the evaluation metric) against steps, redrawn at each epoch end
                last.safetensors (+ last.json)   the latest checkpoint; best.* the best evaluated one

Resuming (``resume=True`` or a checkpoint path) continues exactly (:mod:`.sampling`, :class:`TrainState`).
A non-finite loss (or gradient norm) stops the run before the optimizer step with a
:class:`NonFiniteLossError`. Under ``torchrun`` the model is wrapped in ``DistributedDataParallel`` and each
epoch's permutation is split between the ranks (:class:`~.sampling.EpochSampler`); rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .._io import DISK_FULL_ERRNOS, RunLock, atomic_write
from ..devices import keep_freed_memory
from ..precision import check_dtype
from . import techniques
from .checkpoint import (
    CheckpointError,
    TrainState,
    flatten_optimizer,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optimizer,
)
from .config import TrainConfig
from .distributed import (
    all_reduce_sum,
    barrier,
    broadcast_tensors,
    convert_sync_batchnorm,
    init_distributed,
    is_main_process,
)
from .models import load_state
from .optim import BatchPlan, build_optimizer, lr_factor, progressive_size, schedule_fraction
from .presets import apply_preset, describe_preset
from .records import MetricsLog, RunConsole, TrainWindow, data_counts, data_line, skip_lines
from .sampling import EpochSampler, SeededDataset, micro_batches, rank_seed, seed_everything
from .tasks import ModelSpec, Task, backbone_init, task_for

__all__ = ["Trainer", "NonFiniteLossError", "RunExistsError", "fresh_run_dir", "train"]

#: what may change when a run resumes: how long and where it runs, not what it computes
_RESUMABLE = ("epochs", "max_minutes", "max_steps", "progress", "workers", "device", "threads", "out", "eval_every",
              "eval_every_minutes", "save_every", "log_every", "dist_backend", "dist_timeout", "exist_ok",
              "final_eval", "val_limit")
#: what makes a folder a run's: a new run never writes into one (unless exist_ok)
_RUN_FILES = ("config.json", "last.safetensors", "metrics.csv")


class RunExistsError(ValueError):
    """The run folder holds a run and the new one would overwrite it."""


def fresh_run_dir(cfg: TrainConfig) -> Path:
    """The folder a new run writes: ``cfg.run_dir()`` when it holds no run (or ``exist_ok``); for the default folder
    (no ``out``) the first free ``<name>-2``, ``<name>-3`` ... as ultralytics does; a given ``out`` that holds a run
    raises :class:`RunExistsError` naming ``--resume``, ``--name`` and ``--exist-ok``."""
    base = cfg.run_dir()

    def taken(d: Path) -> bool:
        return any((d / f).exists() for f in _RUN_FILES)

    if cfg.exist_ok or not taken(base):
        return base
    if cfg.out is not None:
        holder = RunLock(base).holder()
        if holder is not None:  # a run that is still going: say that, not only that the folder is taken
            raise RunLock(base).busy_error(holder)
        raise RunExistsError(f"{base}: holds a run already ({', '.join(f for f in _RUN_FILES if (base / f).exists())});"
                             " continue it with --resume, start another with --name NAME or another --out, or "
                             "write over it with --exist-ok")
    k = 2
    while taken(base.with_name(f"{base.name}-{k}")):
        k += 1
    return base.with_name(f"{base.name}-{k}")


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped before the update."""


class _LossModule(nn.Module):
    """The model with its task's loss as forward, for ``DistributedDataParallel`` (DDP synchronises the gradients
    of what runs inside its own forward)."""

    def __init__(self, model: nn.Module, task: Task, device: torch.device, amp: str | None):
        super().__init__()
        self.model, self.task, self.device, self.amp = model, task, device, amp

    def forward(self, batch, size: int | None = None):
        return self.task.loss(self.model, batch, device=self.device, amp=self.amp, size=size)


class Trainer:
    """One training run. ``resume``: ``True`` (the run folder's ``last.safetensors``) or a checkpoint path."""

    def __init__(self, cfg: TrainConfig, *, resume: bool | str | Path = False, console=None):
        ck = None
        if resume:
            path = Path(resume) if not isinstance(resume, bool) else cfg.run_dir() / "last.safetensors"
            ck = load_checkpoint(path)
            if "config" not in ck.state or "step" not in ck.state:
                raise CheckpointError(f"{path}: holds weights only (no training state); it cannot be resumed")
            saved = TrainConfig.from_dict(ck.state["config"])
            changes = {k: getattr(cfg, k) for k in _RESUMABLE if not (k == "out" and cfg.out is None)}
            cfg = dataclasses.replace(saved, **changes)
            if cfg.out is None:
                cfg = dataclasses.replace(cfg, out=str(path.parent))
        else:
            cfg = apply_preset(cfg)  # a no-op where the preset is applied already (the CLI) or is "none"
        cfg.validate()
        self.cfg = cfg
        self.task = task_for(cfg.task, cfg)
        st = TrainState.from_dict(ck.state) if ck is not None else None
        dinfo = init_distributed(cfg.device, cfg.dist_backend, cfg.dist_timeout)
        self.rank, self.world_size, self.device = dinfo.rank, dinfo.world_size, dinfo.device
        self.plan = BatchPlan.for_run(cfg, self.world_size, st and st.global_batch, st and st.world_size)
        if cfg.threads is not None:
            torch.set_num_threads(int(cfg.threads))
        if self.device.type == "cpu":
            keep_freed_memory()  # each step's tensors reuse freed memory instead of faulting in fresh pages
        self.main = is_main_process()
        if ck is None:  # a new run never writes over another: every process looks before rank 0 writes anything
            run_dir = fresh_run_dir(cfg)
            if run_dir != cfg.run_dir():
                cfg = dataclasses.replace(cfg, out=str(run_dir))
                self.cfg = cfg
            barrier()
        self.run_dir = cfg.run_dir()
        # before anything is read or written: a second run on this folder stops here (RunLockedError)
        self.lock = RunLock(self.run_dir).acquire() if self.main else None
        self.out = RunConsole(console, enabled=self.main, progress=cfg.progress)
        self.metrics = MetricsLog(self.run_dir, enabled=self.main)
        seed_everything(cfg.seed)

        self.size = int(cfg.size) if cfg.size is not None else self.task.default_size(cfg.source)
        self.train_set, self.val_set, self.voc = self.task.datasets(cfg, self.size)
        if len(self.train_set) == 0:
            raise ValueError("the training set is empty")
        if cfg.val_limit is not None and self.val_set is not None and len(self.val_set) > cfg.val_limit:
            self.val_set = _first(self.val_set, cfg.val_limit)
        # what the run really uses of its data, printed once and kept in config.json
        self.data_counts = {k: data_counts(ds) for k, ds in (("train", self.train_set), ("val", self.val_set))
                            if ds is not None}
        self.init = backbone_init(cfg)  # config.json's record of how the backbone starts
        self.model_spec: ModelSpec = self.task.model_spec(cfg, self.train_set, self.size)
        # the anchors fitted to the training boxes (preset / anchor_fit), kept in config.json
        self.anchor_fit = getattr(self.task, "anchor_fit", None)
        self.model = self.task.build_model(self.model_spec, None if ck else cfg.backbone_weights,
                                           None if ck else cfg.pretrained).to(self.device)
        if cfg.sync_bn and self.world_size > 1:
            # torch's kernel on CUDA; ours (two all-reduces per layer) on CPU, where torch's has none
            convert = nn.SyncBatchNorm.convert_sync_batchnorm if self.device.type == "cuda" else convert_sync_batchnorm
            self.model = convert(self.model)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg, self.plan.lr)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.ema = techniques.ModelEma(self.model, decay=cfg.ema, warmup=True) if cfg.ema else None
        self.scaler = None
        check_dtype(cfg.amp, self.device, flag=f"--amp {cfg.amp}")
        if cfg.amp == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")

        n, g = len(self.train_set), self.plan.global_batch
        self.drop_last = n >= g
        if not self.drop_last and (self.world_size > 1 or self.plan.accum_steps > 1):
            raise ValueError(f"the training set has {n} images, fewer than one optimizer step's {g} (--batch "
                             f"{self.plan.batch} x {self.world_size} processes x --accum-steps "
                             f"{self.plan.accum_steps}); lower --batch or --accum-steps or use fewer processes")
        self.steps_per_epoch = n // g if self.drop_last else 1
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, self.total_steps // 10)
        # every rank walks the same permutation (its every W-th item), cut to a whole number of optimizer steps
        self.sampler = EpochSampler(n, cfg.seed, rank=self.rank, world_size=self.world_size,
                                    num_samples=self.steps_per_epoch * g if self.drop_last else None)
        self.loader_gen = torch.Generator().manual_seed(cfg.seed)

        self.step = 0
        self.train_seconds = 0.0
        self.warmup_seconds = 0.0  # training time when the warm-up ended: the cosine on time spans the rest
        self.best: float | None = None
        self.last_eval: dict[str, float] = {}
        self._eval_step = -1  # the step last evaluated
        self.stop_reason = ""
        if ck is not None:
            self._restore(ck, st)
        if self.world_size > 1:
            seed_everything(rank_seed(cfg.seed, self.rank, self.step))
        self.ddp: nn.Module | None = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # rank 0's parameters and buffers are broadcast here; gradients are averaged in each backward
            self.ddp = DistributedDataParallel(_LossModule(self.model, self.task, self.device, cfg.amp),
                                               device_ids=None)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in [*self.run_dir.glob(".*.tmp"), *self.run_dir.glob(".*.tmp-*")]:  # a killed write's
                stale.unlink(missing_ok=True)
            atomic_write(self.run_dir / "config.json",
                         json.dumps({**cfg.to_dict(), **self.plan.to_dict(), "init": self.init,
                                     "data": self.data_counts,
                                     **({"anchors": self.anchor_fit} if self.anchor_fit else {})},
                                    indent=1, sort_keys=True) + "\n")
        for name, counts in self.data_counts.items():
            self.out.print(data_line(name, counts))
        if self.val_set is None:
            self.out.print("no validation set: the run is not evaluated and writes no best.safetensors (give "
                           "--val-coco, a VOC split with --voc-val-split, or a val/ folder)")
        for note in self.plan.notes:
            self.out.print(note)
        if ck is None and cfg.preset != "none":
            self.out.print(describe_preset(cfg))
        if ck is None and self.anchor_fit:
            self.out.print(f"anchors fitted to the training boxes: {self.anchor_fit['describe']}")

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows of metrics.csv so far."""
        return self.metrics.rows

    @property
    def primary_metric(self) -> str:
        return self.task.primary_metric

    def close(self) -> None:
        """Drop the DDP wrapper and the run folder's lock; call it before the process group is destroyed (a DDP
        reducer that outlives its group aborts the process at exit)."""
        self.ddp = None
        if self.lock is not None:
            self.lock.release()

    # ----------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        _, opt_rest = flatten_optimizer(self.optimizer)
        _, rng_js = rng_state(self.device)
        ema = None
        if self.ema is not None:
            e = self.ema.state_dict()
            ema = {k: e[k] for k in ("decay", "warmup", "num_updates")}
        return TrainState(
            model=self.model_spec.to_dict(), config=self.cfg.to_dict(), step=self.step,
            steps_per_epoch=self.steps_per_epoch, global_batch=self.plan.global_batch, world_size=self.world_size,
            scheduler={"step": self.step, "warmup": self.warmup, "total_steps": self.total_steps,
                       "base_lrs": self.base_lrs},
            optimizer=opt_rest, rng=rng_js, metric=self.primary_metric, best_metric=self.best,
            train_seconds=self.train_seconds, warmup_seconds=self.warmup_seconds, last_eval=self.last_eval, ema=ema,
            scaler=self.scaler.state_dict() if self.scaler is not None else None).to_dict()

    def save(self, name: str = "last") -> Path | None:
        """Rank 0 writes ``NAME.safetensors`` (the plain model's state_dict: no DDP ``module.`` prefix); every
        rank waits at a barrier until the file is complete, so a peer failing later cannot interrupt a write."""
        path = None
        if self.main:
            opt_t, _ = flatten_optimizer(self.optimizer)
            rng_t, _ = rng_state(self.device)
            groups = {"model": self.model.state_dict(), "optim": opt_t, "rng": rng_t}
            if self.ema is not None:
                groups["ema"] = self.ema.shadow
            try:
                path = save_checkpoint(self.run_dir / f"{name}.safetensors", groups, self.state())
            except OSError as e:
                prev = self.run_dir / f"{name}.safetensors"
                kept = f"{prev} is the previous one, whole" if prev.is_file() else f"no {prev} was written yet"
                why = "the disk is full" if e.errno in DISK_FULL_ERRNOS else "the write failed"
                raise CheckpointError(f"{prev}: cannot write the checkpoint of step {self.step}, {why} "
                                      f"({e.strerror or e}); {kept}; free space and --resume") from None
        barrier()
        return path

    def _restore(self, ck, st: TrainState) -> None:
        saved = ModelSpec.from_dict(st.model)
        if (saved.backbone, saved.num_classes) != (self.model_spec.backbone, self.model_spec.num_classes):
            raise CheckpointError(f"{ck.path}: is for {saved.describe()}, not {self.model_spec.describe()}")
        load_state(self.model, ck.tensors("model"), ck.path, saved)
        try:
            self.optimizer.load_state_dict(unflatten_optimizer(ck.tensors("optim"), st.optimizer))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{ck.path}: optimizer state does not fit this run: {e}") from None
        # the saved moments are contiguous; a fresh run's have their parameter's layout (channels_last): give them
        # that layout back, or the update's kernels take another path and the resumed run drifts in the last bits
        for p, state in self.optimizer.state.items():
            for k, v in state.items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
        if self.ema is not None:
            if st.ema is None:
                raise CheckpointError(f"{ck.path}: the run uses EMA but the checkpoint has no averaged weights")
            self.ema.load_state_dict(dict(st.ema, shadow=ck.tensors("ema")))
        if self.scaler is not None and st.scaler is not None:
            self.scaler.load_state_dict(st.scaler)
        self.step = int(st.step)
        self.base_lrs = list(st.scheduler.get("base_lrs", self.base_lrs))
        self.warmup = int(st.scheduler.get("warmup", self.warmup))
        self.best, self.last_eval = st.best_metric, st.last_eval
        self.train_seconds, self.warmup_seconds = float(st.train_seconds), float(st.warmup_seconds)
        set_rng_state(ck.tensors("rng"), st.rng)
        self.metrics.load(self.step)

    # ----------------------------------------------------------------------------------- one step
    def compute_loss(self, batch) -> tuple[Tensor, dict[str, Tensor], int]:
        """(total loss, its parts, number of images) of one batch at this step's input size."""
        return self.task.loss(self.model, batch, device=self.device, amp=self.cfg.amp, size=self.train_size())

    def schedule_fraction(self) -> float:
        """How far the run is through its schedule, 0..1: the time budget used with ``schedule_on_time``, else
        the steps done."""
        if self.cfg.schedule_on_time and self.cfg.max_minutes is not None:
            return schedule_fraction(self.train_seconds, 60 * self.cfg.max_minutes)
        return schedule_fraction(self.step, self.total_steps)

    def train_size(self) -> int | None:
        """The input size of the next training step under ``cfg.progressive`` (None: the run's size)."""
        return progressive_size(self.cfg.progressive, self.schedule_fraction(), self.size) if self.cfg.progressive \
            else None

    def _lr_factor(self) -> float:
        frac = None
        if self.cfg.schedule_on_time and self.cfg.max_minutes is not None:
            # on a time budget the warm-up ends after its steps or a tenth of the budget, whichever comes first
            # (a slow machine would spend a short budget warming up)
            if self.step < self.warmup and self.train_seconds >= 6 * self.cfg.max_minutes:
                self.warmup = self.step
            if self.step <= self.warmup:
                self.warmup_seconds = self.train_seconds
            frac = schedule_fraction(self.train_seconds, 60 * self.cfg.max_minutes, self.warmup_seconds)
        return lr_factor(self.step, self.cfg, self.steps_per_epoch, self.total_steps, self.warmup, frac)

    def _nonfinite(self, what: str, value: float, parts: dict[str, float]) -> NonFiniteLossError:
        last = self.run_dir / "last.safetensors"
        have = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        detail = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        return NonFiniteLossError(
            f"{what} is {value} at step {self.step + 1} (epoch {self.step // self.steps_per_epoch + 1})"
            f"{' (' + detail + ')' if detail else ''}; training stopped before the update and {have}. "
            "Try a lower --lr, a longer warm-up, --clip, or no --amp fp16.")

    def train_step(self, batch) -> tuple[float, dict[str, float], int]:
        """One optimizer step over ``batch``: a batch, or a list of ``accum_steps`` micro-batches whose
        gradients are accumulated (averaged). With several processes the gradients are averaged over them too
        (DDP, synchronised on the last micro-batch only). Returns (loss, its parts, images) over every
        micro-batch of every process."""
        batches = list(batch) if isinstance(batch, list) else [batch]
        factor = self._lr_factor()
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor
        (self.ddp or self.model).train()
        self.optimizer.zero_grad(set_to_none=True)
        k, keys, sums, n = len(batches), [], None, 0
        for i, b in enumerate(batches):
            no_sync = self.ddp.no_sync() if self.ddp is not None and i < k - 1 else contextlib.nullcontext()
            with no_sync:
                total, parts, n_i = self.ddp(b, size=self.train_size()) if self.ddp is not None \
                    else self.compute_loss(b)
                keys = keys or sorted(parts)
                vals = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).cpu()
                                    for v in (total, *(parts[key] for key in keys))])
                if self.world_size == 1 and not math.isfinite(float(vals[0])):  # stop before the backward pass
                    raise self._nonfinite("the loss", float(vals[0]), dict(zip(keys, vals[1:].tolist())))
                loss_i = total / k if k > 1 else total
                (self.scaler.scale(loss_i) if self.scaler is not None else loss_i).backward()
            sums = vals if sums is None else sums + vals
            n += int(n_i)
        # the mean loss and parts over every micro-batch of every process, and the image count: one all-reduce,
        # after which every rank takes the same decision on a non-finite loss (before the update)
        stats = torch.cat([sums, torch.tensor([float(n)], dtype=torch.float64)])
        if self.world_size > 1:
            stats = all_reduce_sum(stats.to(self.device)).cpu()
        loss_v = float(stats[0]) / (k * self.world_size)
        parts_f = {key: float(v) / (k * self.world_size) for key, v in zip(keys, stats[1:-1])}
        n = int(round(float(stats[-1])))
        if not math.isfinite(loss_v):
            raise self._nonfinite("the loss", loss_v, parts_f)
        if self.scaler is not None:
            if self.cfg.clip is not None:
                self.scaler.unscale_(self.optimizer)
                techniques.clip_gradients(self.model, self.cfg.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.cfg.clip is not None:
                norm = float(techniques.clip_gradients(self.model, self.cfg.clip))
                if not math.isfinite(norm):
                    raise self._nonfinite("the gradient norm", norm, parts_f)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return loss_v, parts_f, n

    # ----------------------------------------------------------------------------------- evaluation
    def _val_loader(self) -> DataLoader:
        ds = self.val_set
        if self.world_size > 1:  # this rank's share: every W-th image (no padding, so nothing counts twice)
            ds = torch.utils.data.Subset(ds, range(self.rank, len(ds), self.world_size))
        return DataLoader(ds, batch_size=self.plan.batch, shuffle=False, num_workers=self.cfg.workers,
                          collate_fn=self.task.collate)

    def evaluate(self, breakdown: bool = False) -> dict[str, float]:
        """The validation metrics (detection with ``breakdown``: also per class and class-agnostic). With several
        processes each evaluates its share with rank 0's BatchNorm statistics (and running average); every rank
        returns the metrics of one process evaluating the whole set."""
        if self.val_set is None:
            return {}
        dist = self.world_size > 1
        if dist:
            broadcast_tensors(list(self.model.buffers()))
            if self.ema is not None:
                broadcast_tensors(list(self.ema.shadow.values()))
        # the evaluation's loader draws from torch's generator: forked, so that training's randomness (flips, the
        # next epochs' order) does not depend on when or whether the run evaluated (a time-based evaluation, the
        # final one of a run stopped early and resumed later)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), \
                self.ema.applied_to(self.model) if self.ema is not None else contextlib.nullcontext():
            m = self.task.evaluate(self.model, self._val_loader(), self.val_set, device=self.device, amp=self.cfg.amp,
                                   voc=self.voc, distributed=dist, breakdown=breakdown)
        self.last_eval = m
        return m

    def _final_eval(self) -> None:
        """A run stopped early (time budget, max_steps, Ctrl-C) ends with its score: the weights it keeps (the
        EMA where on) evaluated once, unless this step was evaluated already or ``final_eval`` is off; the last
        checkpoint is written again with those metrics."""
        if not self.cfg.final_eval or self.val_set is None or self.step == 0 or self._eval_step == self.step:
            return
        self.out.print(f"{self.stop_reason}: evaluating the weights of step {self.step}"
                       f"{' (EMA)' if self.ema is not None else ''} on {len(self.val_set)} images")
        t0 = time.perf_counter()
        self._eval_and_record(self.step // self.steps_per_epoch)
        self.out.print(f"final evaluation took {time.perf_counter() - t0:.0f} s (not counted in the training time)")
        self.save("last")

    def _eval_and_record(self, epoch: int) -> None:
        m = self.evaluate() if self.val_set is not None else {}
        self._eval_step = self.step
        if not m:
            return
        row = {"kind": "eval", "epoch": round(self.step / self.steps_per_epoch, 4), "step": self.step,
               "train_minutes": self.train_seconds / 60}
        row.update({k: v for k, v in m.items() if isinstance(v, (int, float))})
        self.metrics.append(row)
        self.metrics.write()
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "eval_seconds")
        self.out.print(f"eval at step {self.step} (epoch {epoch + 1}): {shown}")
        value = m.get(self.primary_metric)
        if value is not None and (self.best is None or value > self.best):
            self.best = float(value)
            self.save("best")

    # ----------------------------------------------------------------------------------- the loop
    def _train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        # resuming mid-epoch: start_batch optimizer steps of global_batch images are done; this rank's share
        self.sampler.set_epoch(epoch, start_batch * self.plan.global_batch // self.world_size)
        return DataLoader(SeededDataset(self.train_set), batch_size=self.plan.batch, sampler=self.sampler,
                          num_workers=self.cfg.workers, collate_fn=self.task.collate, drop_last=self.drop_last,
                          generator=self.loader_gen, persistent_workers=False,
                          pin_memory=self.device.type == "cuda")

    def _agreed_seconds(self, seconds: float) -> float:
        """Rank 0's training time on every rank, so that time-based decisions agree everywhere."""
        if self.world_size == 1:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        broadcast_tensors([t])
        return float(t)

    def _stop(self) -> str:
        cfg = self.cfg
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return f"reached max_steps {cfg.max_steps}"
        if cfg.max_minutes is not None and self.train_seconds >= 60 * cfg.max_minutes:
            return f"reached the time budget ({cfg.max_minutes:g} min)"
        return ""

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to ``max_steps`` / ``max_minutes``); returns a summary. The run folder's lock is
        released when it returns or raises."""
        try:
            return self._fit()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> dict[str, Any]:
        cfg, spe = self.cfg, self.steps_per_epoch
        start_epoch, start_batch = divmod(self.step, spe)
        progress = self.out.progress_bar()
        last_eval_t = self.train_seconds
        window = TrainWindow()
        window_ips = _Rate()
        last_line, steps_run, run_start = time.monotonic(), 0, self.train_seconds
        if self.step >= self.total_steps:
            self.stop_reason = "already finished"
        interrupt = _Interrupt(enabled=self.world_size == 1)
        with interrupt, progress if progress is not None else contextlib.nullcontext():
            bar = progress.add_task("train", total=spe, epoch=0, loss=float("nan"), lr=0.0, ips=0.0) \
                if progress is not None else None
            for epoch in range(start_epoch, cfg.epochs):
                if bar is not None:
                    progress.reset(bar, total=spe, completed=start_batch if epoch == start_epoch else 0)
                    progress.update(bar, epoch=f"{epoch + 1}/{cfg.epochs}")
                t_fetch = time.perf_counter()
                loader = self._train_loader(epoch, start_batch if epoch == start_epoch else 0)
                for batch in micro_batches(loader, self.plan.accum_steps):
                    loss, parts, n = self.train_step(batch)
                    dt = time.perf_counter() - t_fetch
                    t_fetch = time.perf_counter()
                    self.train_seconds = self._agreed_seconds(self.train_seconds + dt)
                    window.add(loss, parts, n, dt)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if bar is not None:
                        self.out.show_step(progress, bar, loss, lr, n / max(dt, 1e-9), self.step, spe,
                                           self.train_seconds, self.metrics.last(), cfg.log_every)
                    elif self.step % (10 * cfg.log_every) == 0 or time.monotonic() - last_line >= 60:
                        # no progress bar (--no-progress, a log file): a line every 10 log intervals or minute
                        self.out.print(self._status_line(loss, lr, window_ips.rate(n, dt), steps_run, run_start))
                        last_line = time.monotonic()
                    steps_run += 1
                    if self.step % cfg.log_every == 0 or self.step % spe == 0:
                        self.metrics.append(window.row(self.step, spe, lr, self.train_seconds))
                    if cfg.save_every is not None and self.step % cfg.save_every == 0:
                        self.save("last")
                    every = cfg.eval_every_minutes
                    if every is not None and self.train_seconds - last_eval_t >= 60 * every:
                        self._eval_and_record(epoch)
                        last_eval_t, t_fetch = self.train_seconds, time.perf_counter()
                    self.stop_reason = self._stop() or interrupt.reason()
                    if self.stop_reason:
                        break
                if self.step % spe == 0 and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    self._eval_and_record(epoch)
                    last_eval_t = self.train_seconds
                self.save("last")
                self.metrics.write()
                self.metrics.plot(self.primary_metric, f"{self.model_spec.backbone} ({cfg.task})")
                if self.stop_reason:
                    break
        if self.stop_reason and self.stop_reason != "already finished":
            self._final_eval()
        self.stop_reason = self.stop_reason or f"finished {cfg.epochs} epochs"
        summary = {"steps": self.step, "epochs": self.step / spe, "train_minutes": self.train_seconds / 60,
                   "best_metric": self.best, "metric": self.primary_metric, "last_eval": self.last_eval,
                   "run_dir": str(self.run_dir), "stop_reason": self.stop_reason, "skipped": self.skip_summary()}
        barrier()  # the job ends together, after rank 0's last writes
        self.out.print(f"{self.stop_reason}: {self.step} steps in {self.train_seconds / 60:.1f} min; "
                       f"checkpoint {self.run_dir / 'last.safetensors'}")
        for line in self.skip_summary():
            self.out.print(line)
        return summary

    def _status_line(self, loss: float, lr: float, ips: float, steps_run: int, run_start: float) -> str:
        """``step 120/1000 (epoch 1.20): loss 1.2345  lr 1.00e-02  6.1 img/s  4.2 min, ETA 31 min``"""
        cfg = self.cfg
        total = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        per_step = (self.train_seconds - run_start) / max(steps_run + 1, 1)
        eta = (total - self.step) * per_step
        if cfg.max_minutes is not None:
            eta = min(eta, max(60 * cfg.max_minutes - self.train_seconds, 0.0))
        if cfg.max_minutes is not None and eta >= max(60 * cfg.max_minutes - self.train_seconds, 0.0) - 1e-6:
            # the time budget ends the run: the step count says nothing about how far it is
            return (f"step {self.step} (epoch {self.step / self.steps_per_epoch:.2f}): loss {loss:.4f}  "
                    f"lr {lr:.2e}  {ips:.1f} img/s  {self.train_seconds / 60:.1f} of {cfg.max_minutes:g} min, "
                    f"ETA {eta / 60:.1f} min")
        return (f"step {self.step}/{total} (epoch {self.step / self.steps_per_epoch:.2f}): loss {loss:.4f}  "
                f"lr {lr:.2e}  {ips:.1f} img/s  {self.train_seconds / 60:.1f} min, ETA {eta / 60:.1f} min")

    def skip_summary(self) -> list[str]:
        return skip_lines({"train": self.train_set, "val": self.val_set}, workers=self.cfg.workers)


def _first(dataset, n: int):
    """The first ``n`` images of a validation set (``val_limit``): a detection set keeps its type (its records cut,
    so its COCO ground truth is of those images only), any other set a ``Subset``."""
    if hasattr(dataset, "records"):
        import copy

        part = copy.copy(dataset)
        part.records = dataset.records[:n]
        return part
    return torch.utils.data.Subset(dataset, range(n))


class _Interrupt:
    """Ctrl-C while training (one process): the first stops the run after the step under way, so that it saves
    and evaluates what it has; a second one interrupts at once (KeyboardInterrupt). Several processes keep the
    plain KeyboardInterrupt (they would not agree on the step)."""

    def __init__(self, enabled: bool = True):
        import threading

        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.hit = False
        self._prev = None

    def _handler(self, signum, frame) -> None:
        import signal

        self.hit = True
        signal.signal(signal.SIGINT, self._prev)  # the next Ctrl-C raises KeyboardInterrupt

    def reason(self) -> str:
        return "interrupted (Ctrl-C; press it again to stop at once)" if self.hit else ""

    def __enter__(self):
        if self.enabled:
            import signal

            prev = signal.signal(signal.SIGINT, self._handler)
            self._prev = prev if prev is not None else signal.default_int_handler
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            import signal

            if signal.getsignal(signal.SIGINT) == self._handler:
                signal.signal(signal.SIGINT, self._prev)


class _Rate:
    """Images per second over the last steps (an exponential average, so one slow step does not dominate)."""

    def __init__(self):
        self.value: float | None = None

    def rate(self, images: int, seconds: float) -> float:
        now = images / max(seconds, 1e-9)
        self.value = now if self.value is None else 0.8 * self.value + 0.2 * now
        return self.value


def train(cfg: TrainConfig, resume: bool | str | Path = False, console=None) -> dict[str, Any]:
    """Train with ``cfg``; returns the summary of :meth:`Trainer.fit`."""
    trainer = Trainer(cfg, resume=resume, console=console)
    try:
        return trainer.fit()
    finally:
        trainer.close()
