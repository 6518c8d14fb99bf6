"""The training loop, for detection (RetinaNet on any backbone) and classification (any backbone).

``Trainer(TrainConfig(...)).fit()`` builds the data, the model, the optimizer (SGD, AdamW or
RMSProp), the learning-rate schedule (linear warm-up, then cosine, step or constant), optional AMP
(bf16 autocast on CPU, fp16 with a GradScaler or bf16 on CUDA), gradient clipping, a running average
of the weights (EMA), label smoothing and auxiliary-classifier losses (the last four from
:mod:`vertebra.engine.techniques`), and writes a run folder::

    runs/<name>/config.json      the resolved config
                metrics.csv      one row per log interval (loss, parts, lr, images/s) and per evaluation
                loss.png         loss (and the evaluation metric) against steps, redrawn at each epoch end
                last.safetensors (+ last.json)   the latest checkpoint; best.* the best evaluated one

Resuming (``resume=True`` or a checkpoint path) continues exactly: the sample order of an epoch and each
sample's augmentation are functions of (seed, epoch, index) alone, and the model, optimizer, EMA,
scheduler position, AMP scaler and every RNG state come back from the checkpoint, so N steps in one go
and N/2 + resume + N/2 give the same parameters on CPU.

A non-finite loss (or gradient norm) stops the run before the optimizer step with a
:class:`NonFiniteLossError` naming the step and the last good checkpoint, which is left as it was.

Several processes (``torchrun --nproc_per_node N [--nnodes M ...] -m vertebra train ...``): the Trainer joins
the process group torchrun describes (:func:`~vertebra.engine.distributed.init_distributed`: gloo on CPU,
nccl on CUDA, ``cuda:LOCAL_RANK``), wraps the model in ``DistributedDataParallel`` (optionally with
BatchNorm synchronised across the processes, ``sync_bn``) and splits each epoch's permutation between the
ranks (:class:`EpochSampler`: rank r takes every W-th item), so an optimizer step sees the same
``global_batch = batch x world_size x accum_steps`` images, with the same augmentation, whatever the number
of processes. ``accum_steps`` micro-batches are accumulated per step (DDP's ``no_sync`` on all but the last).
Rank 0 alone writes checkpoints, metrics, plots and draws the progress bar; evaluation is split between the
ranks and gathered on rank 0, and the metrics are broadcast. A checkpoint holds the plain model's
state_dict and its position as a step count of ``global_batch`` images, so a run resumes on another number
of processes: the global batch is kept and ``accum_steps`` (or, if that does not divide, the per-process
``batch``) is recomputed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import techniques
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    flatten_optimizer,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer,
)
from .config import TrainConfig, default_shapes_root
from .distributed import (
    all_reduce_sum,
    barrier,
    broadcast_tensors,
    convert_sync_batchnorm,
    init_distributed,
    is_distributed,
    is_main_process,
)
from .evaluate import evaluate_classifier, evaluate_detector
from .models import IMAGENET_MEAN, IMAGENET_STD, build_model, default_detector_kwargs, describe, load_state

__all__ = ["Trainer", "NonFiniteLossError", "EpochSampler", "SeededDataset", "build_datasets", "train",
           "lr_factor"]

log = logging.getLogger("vertebra.engine")


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped before the update."""


# --------------------------------------------------------------------------------------------- data


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919_111 + int(index) * 2_654_435_761) % (2**62)


class EpochSampler(Sampler):
    """Indices of an epoch in an order fixed by (seed, epoch), each with its augmentation seed.

    Yields ``(index, sample_seed)`` pairs for :class:`SeededDataset`. ``start`` skips the first items
    of this rank's share (resuming mid-epoch without loading them). With several processes each ``rank``
    takes every ``world_size``-th item of the same permutation, so consecutive per-rank batches of ``b``
    make up consecutive global batches of ``b x world_size`` items whatever the number of processes.
    ``num_samples`` uses only the permutation's first items (a whole number of global batches: every rank
    then gets the same number of batches).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 num_samples: int | None = None):
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        self.num_samples = self.n if num_samples is None else min(int(num_samples), self.n)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return order[:self.num_samples][self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._order()[self.start:]:
            yield i, _sample_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return max(0, len(self._order()) - self.start)


class SeededDataset(Dataset):
    """Loads ``dataset[index]`` with torch's CPU generator seeded by the sample's seed (the global
    generator is restored afterwards), so random augmentation does not depend on what ran before."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _find(root: Path, candidates: tuple[str, ...]) -> Path | None:
    for c in candidates:
        if (root / c).exists():
            return root / c
    return None


def _coco_layout(root: Path, split: str) -> tuple[Path, Path] | None:
    ann = _find(root / "annotations", (f"instances_{split}.json", f"instances_{split}2017.json",
                                       f"instances_{split}2014.json"))
    img = _find(root, (split, f"{split}2017", f"{split}2014", "images/" + split))
    if ann is None or img is None:
        return None
    return img, ann


def ensure_shapes(root: Path | None = None) -> Path:
    """The built-in shapes set, generated into ``root`` (default :func:`default_shapes_root`) if absent."""
    from ..data.shapes import _is_shapes_set, write_shapes

    root = Path(root) if root is not None else default_shapes_root()
    if not _is_shapes_set(root) and is_main_process():
        print(f"generating the shapes set into {root} (once; about a minute)...", flush=True)
        write_shapes(root)
    if is_distributed():  # rank 0 writes it; the others wait, then read it
        barrier()
        if not _is_shapes_set(root):
            raise FileNotFoundError(f"{root}: the shapes set rank 0 wrote is not on this machine; put it on a "
                                    "shared file system or write it on every machine first "
                                    "(vertebra data shapes --out DIR, then --data DIR)")
    return root


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """(train set, validation set or None, info: categories, label_to_category_id, voc flag)."""
    from ..data import CIFAR, CocoDetection, ImageFolder, VOCDetection
    from ..data.transforms import classification_transforms, detection_transforms

    size = cfg.resolved_size()
    if cfg.task == "det":
        hflip = 0.0 if cfg.augment == "none" else 0.5
        t_train = detection_transforms(True, size, scale_range=(1.0, 1.0), hflip=hflip,
                                       photometric=cfg.augment == "full")
        t_val = detection_transforms(False, size)
        voc = False
        if cfg.voc:
            root = Path(cfg.voc)
            train = VOCDetection(root, cfg.voc_train_split, t_train, skip_bad=cfg.skip_bad)
            split_file = root / "ImageSets" / "Main" / f"{cfg.voc_val_split}.txt"
            val = VOCDetection(root, cfg.voc_val_split, t_val, skip_bad=cfg.skip_bad) if split_file.is_file() else None
            voc = True
        elif cfg.coco_ann:
            train = CocoDetection(cfg.coco_images, cfg.coco_ann, t_train, skip_bad=cfg.skip_bad)
            val = None
            if cfg.val_coco_ann:
                val = CocoDetection(cfg.val_coco_images or cfg.coco_images, cfg.val_coco_ann, t_val,
                                    skip_bad=cfg.skip_bad)
        else:
            root = Path(cfg.data) if cfg.data else ensure_shapes()
            tr = _coco_layout(root, "train")
            if tr is None:
                raise FileNotFoundError(f"{root}: no COCO layout found (annotations/instances_train*.json and "
                                        "train*/); give --coco ANN --images DIR or --voc ROOT instead")
            train = CocoDetection(tr[0], tr[1], t_train, skip_bad=cfg.skip_bad)
            va = _coco_layout(root, "val")
            val = CocoDetection(va[0], va[1], t_val, skip_bad=cfg.skip_bad) if va else None
        info = {"categories": list(train.categories),
                "label_to_category_id": {str(k): v for k, v in train.label_to_category_id.items()}, "voc": voc}
        return train, val, info
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    t_train = classification_transforms(True, size, mean=mean, std=std)
    t_val = classification_transforms(False, size, mean=mean, std=std)
    if cfg.cifar:
        train = CIFAR(cfg.cifar, True, t_train)
        val = CIFAR(cfg.cifar, False, t_val)
    else:
        root = Path(cfg.folder)
        if (root / "train").is_dir():
            train = ImageFolder(root / "train", t_train, skip_bad=cfg.skip_bad)
            val = ImageFolder(root / "val", t_val, classes=train.classes, skip_bad=cfg.skip_bad) \
                if (root / "val").is_dir() else None
        else:
            train, val = ImageFolder(root, t_train, skip_bad=cfg.skip_bad), None
    info = {"categories": list(train.classes),
            "label_to_category_id": {str(i): i for i in range(len(train.classes))}, "mean": list(mean),
            "std": list(std)}
    return train, val, info


# --------------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int, total_steps: int, warmup: int,
              time_fraction: float | None = None) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up from ``warmup_factor``
    over ``warmup`` steps, then cosine to ``min_lr_ratio``, step decay, or constant. ``time_fraction``
    (the part of a time budget used) replaces the step position in the cosine when given."""
    if warmup > 0 and step < warmup:
        a = step / warmup
        return cfg.warmup_factor * (1 - a) + a
    if cfg.schedule == "cosine":
        t = (step - warmup) / max(1, total_steps - warmup) if time_fraction is None else time_fraction
        t = min(max(t, 0.0), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        epoch = step / max(1, steps_per_epoch)
        if cfg.step_epochs:
            return cfg.step_gamma ** sum(1 for e in cfg.step_epochs if epoch >= e)
        if cfg.optimizer == "rmsprop":  # Inception-v3: x0.94 every two epochs
            return 0.94 ** math.floor(epoch / 2)
        return cfg.step_gamma ** sum(1 for e in (int(cfg.epochs * 2 / 3), int(cfg.epochs * 8 / 9)) if epoch >= e)
    return 1.0


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.resolved_weight_decay())
    lr = cfg.lr_for(cfg.global_batch or cfg.batch * cfg.accum_steps)
    # fused kernels (one pass over every parameter, CPU and CUDA): AdamW's step is ~5x faster than the loop
    fused = {"fused": True} if all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                   for g in groups for p in g["params"]) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fused)
    # RMSProp as Inception-v3 trained (TensorFlow's update; decay 0.9, eps 1.0, momentum 0.9)
    return techniques.RMSpropTF(groups, lr=lr, alpha=0.9, eps=1.0, momentum=cfg.momentum)


# --------------------------------------------------------------------------------------------- RNG state


def _rng_state(device: torch.device) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    v, st, gauss = random.getstate()
    npst = np.random.get_state()
    js = {"python": [v, list(st), gauss],
          "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, js


def _set_rng_state(tensors: dict[str, Tensor], js: dict[str, Any]) -> None:
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v.to(torch.uint8) for _, v in cuda])
    if "python" in js:
        v, st, gauss = js["python"]
        random.setstate((v, tuple(st), gauss))
    if "numpy" in js:
        name, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------------- trainer


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of ``rank`` from ``step`` on (dropout, drop path: each process draws its own)."""
    return (int(seed) * 998_244_353 + (int(rank) + 1) * 1_000_000_007 + int(step) * 19_260_817) % (2**62)


class _LossModule(nn.Module):
    """The model with ``Trainer.compute_loss`` as its forward, for ``DistributedDataParallel``: DDP synchronises
    the gradients of what runs inside its own forward, and the detection loss calls the detector's parts."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.model = trainer.model
        self._loss = lambda batch: trainer.compute_loss(batch)

    def forward(self, batch):
        return self._loss(batch)


def _plain_target(t: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    return {"boxes": t["boxes"].as_subclass(Tensor).to(device, torch.float32),
            "labels": t["labels"].as_subclass(Tensor).to(device)}


class Trainer:
    """One training run. ``resume``: ``True`` (the run folder's ``last.safetensors``) or a checkpoint path."""

    def __init__(self, cfg: TrainConfig, *, resume: bool | str | Path = False, console=None):
        self.console = console
        ck = None
        if resume:
            path = Path(resume) if not isinstance(resume, bool) else cfg.run_dir() / "last.safetensors"
            ck = load_checkpoint(path)
            if "config" not in ck.state or "step" not in ck.state:
                raise CheckpointError(f"{path}: holds weights only (no training state); it cannot be resumed")
            saved = TrainConfig.from_dict(ck.state["config"])
            # what may change on resume: how long and where it runs, not what it computes
            for k in ("epochs", "max_minutes", "max_steps", "progress", "workers", "device", "threads", "out",
                      "eval_every", "eval_every_minutes", "save_every", "log_every", "dist_backend", "dist_timeout"):
                if k == "out" and cfg.out is None:
                    continue
                setattr(saved, k, getattr(cfg, k))
            if saved.out is None:
                saved.out = str(path.parent)
            cfg = saved
        else:
            cfg = dataclasses.replace(cfg)  # the resolved fields below belong to this run, not the caller's object
        cfg.validate()
        self.cfg = cfg
        self.notes: list[str] = []
        dinfo = init_distributed(cfg.device, cfg.dist_backend, cfg.dist_timeout)
        self.rank, self.world_size = dinfo.rank, dinfo.world_size
        self.device = dinfo.device
        self._resolve_batch(cfg, resumed=ck is not None)
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.main = is_main_process()
        self.run_dir = cfg.run_dir()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        self.train_set, self.val_set, info = build_datasets(cfg)
        if len(self.train_set) == 0:
            raise ValueError("the training set is empty")
        num_classes = len(info["categories"])
        size = cfg.resolved_size()
        if cfg.task == "det":
            from ..registry import backbone_spec

            n_stages = None
            try:
                with torch.device("meta"):
                    from ..registry import create_backbone
                    n_stages = len(create_backbone(cfg.backbone, features_only=True,
                                                   **cfg.backbone_kwargs).feature_info)
            except Exception:  # noqa: BLE001 - the detector reports a bad backbone itself
                backbone_spec(cfg.backbone)
            det_kw = default_detector_kwargs(size, cfg.backbone_weights is not None, n_stages)
            det_kw.update(cfg.detector_kwargs)
            self.spec = {"task": "det", "detector": "retinanet", "backbone": cfg.backbone, "num_classes": num_classes,
                         "categories": info["categories"], "label_to_category_id": info["label_to_category_id"],
                         "detector_kwargs": det_kw, "backbone_kwargs": dict(cfg.backbone_kwargs),
                         "head_convs": cfg.head_convs, "size": size}
        else:
            self.spec = {"task": "cls", "backbone": cfg.backbone, "num_classes": num_classes,
                         "categories": info["categories"], "backbone_kwargs": dict(cfg.backbone_kwargs),
                         "size": size, "mean": info["mean"], "std": info["std"]}
        self.voc = bool(info.get("voc"))
        self.model = build_model(self.spec, None if ck else cfg.backbone_weights).to(self.device)
        if cfg.progressive and cfg.task == "det" and not (hasattr(self.model, "compute_loss")
                                                          and hasattr(self.model, "net")):
            # compute_loss resizes through the RetinaNet path only; any other detector would ignore the sizes
            raise ValueError(f"progressive resizing needs a RetinaNet-like detector (net, transform, "
                             f"compute_loss); {type(self.model).__name__} is not one")
        if cfg.sync_bn and self.world_size > 1:
            # torch's kernel on CUDA; ours (two all-reduces per layer) on CPU, where torch's has none
            convert = nn.SyncBatchNorm.convert_sync_batchnorm if self.device.type == "cuda" else convert_sync_batchnorm
            self.model = convert(self.model)
        if cfg.channels_last:
            if hasattr(self.model, "channels_last") and callable(self.model.channels_last):
                self.model.channels_last()
            else:
                self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.ema = techniques.ModelEma(self.model, decay=cfg.ema, warmup=True) if cfg.ema else None
        self.scaler = None
        if cfg.amp == "fp16":
            if self.device.type != "cuda":
                raise ValueError("fp16 AMP needs a CUDA device; on CPU use --amp bf16")
            self.scaler = torch.amp.GradScaler("cuda")
        if cfg.label_smoothing > 0:
            self.criterion: Callable = lambda x, y: techniques.label_smoothing_cross_entropy(
                x, y, cfg.label_smoothing)
        else:
            self.criterion = lambda x, y: F.cross_entropy(x.float(), y)
        self.aux_weight = cfg.aux_weight
        if self.aux_weight is None:
            self.aux_weight = (techniques.INCEPTION_V3_AUX_WEIGHT if "inception_v3" in cfg.backbone
                               else techniques.GOOGLENET_AUX_WEIGHT)

        n, g = len(self.train_set), cfg.global_batch
        drop_last = n >= g
        if not drop_last and (self.world_size > 1 or cfg.accum_steps > 1):
            raise ValueError(f"the training set has {n} images, fewer than one optimizer step's {g} (--batch "
                             f"{cfg.batch} x {self.world_size} processes x --accum-steps {cfg.accum_steps}); "
                             "lower --batch or --accum-steps or use fewer processes")
        self.steps_per_epoch = n // g if drop_last else 1
        self.drop_last = drop_last
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, self.total_steps // 10)
        # every rank walks the same permutation (its every W-th item), cut to a whole number of optimizer steps
        self.sampler = EpochSampler(n, cfg.seed, rank=self.rank, world_size=self.world_size,
                                    num_samples=self.steps_per_epoch * g if drop_last else None)
        self.loader_gen = torch.Generator().manual_seed(cfg.seed)

        self.step = 0
        self.train_seconds = 0.0
        self.warmup_seconds = 0.0
        self.best: float | None = None
        self.rows: list[dict[str, Any]] = []
        self.last_eval: dict[str, float] = {}
        self.stop_reason = ""
        if ck is not None:
            self._restore(ck)
        if self.world_size > 1:
            s = _rank_seed(cfg.seed, self.rank, self.step)
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
        self.ddp: nn.Module | None = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # rank 0's parameters and buffers are broadcast here; gradients are averaged in each backward
            self.ddp = DistributedDataParallel(_LossModule(self), device_ids=None)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(".*.tmp-*"):  # left by a process killed while writing
                stale.unlink(missing_ok=True)
            atomic_write_text(self.run_dir / "config.json", cfg.to_json() + "\n")
        for note in self.notes:
            self._print(note)

    def close(self) -> None:
        """Drop the DDP wrapper. Call it before the process group is destroyed (``cmd_train`` does): a DDP
        reducer that outlives its group aborts the process at exit ("terminate called without an active
        exception")."""
        if self.ddp is not None:
            self.ddp = None
            gc.collect()  # the wrapper and the Trainer reference each other

    def _resolve_batch(self, cfg: TrainConfig, resumed: bool) -> None:
        """Fill ``world_size``, ``global_batch`` and ``scaled_lr``. A fresh run: ``batch x world_size x
        accum_steps``. A resumed one keeps its global batch (what an optimizer step computes) and splits it over
        this run's processes: ``accum_steps`` is recomputed for the same per-process ``batch``, else ``batch``
        for the same ``accum_steps``, else ``batch`` with no accumulation."""
        w = self.world_size
        if not resumed:
            g = cfg.batch * w * cfg.accum_steps
            if cfg.sync_bn and w == 1:
                raise ValueError("--sync-bn needs several processes (torchrun --nproc_per_node N -m vertebra train "
                                 "...); in one process BatchNorm already sees the whole batch")
            if cfg.lr_scale == "linear" and cfg.lr_ref_batch is None:
                cfg.lr_ref_batch = cfg.batch  # stated in config.json, and fixed for the run's resumptions
        else:
            g = cfg.global_batch or cfg.batch * cfg.accum_steps * cfg.world_size
            before = (cfg.batch, cfg.accum_steps, cfg.world_size)
            if g % (cfg.batch * w) == 0:
                cfg.accum_steps = g // (cfg.batch * w)
            elif g % (w * cfg.accum_steps) == 0:
                cfg.batch = g // (w * cfg.accum_steps)
            elif g % w == 0:
                cfg.batch, cfg.accum_steps = g // w, 1
            else:
                raise ValueError(f"the checkpoint's global batch of {g} images per optimizer step cannot be split "
                                 f"over {w} processes; resume on a number of processes that divides {g}")
            if (cfg.batch, cfg.accum_steps, w) != before:
                self.notes.append(f"resuming on {w} process(es) (the checkpoint ran on {before[2]}): the global "
                                  f"batch stays {g} = --batch {cfg.batch} x {w} x --accum-steps {cfg.accum_steps}")
            if cfg.sync_bn and w == 1:
                self.notes.append("sync_bn has no effect in one process (BatchNorm sees the whole batch)")
        cfg.world_size, cfg.global_batch = w, g
        cfg.scaled_lr = cfg.lr_for(g)

    # ----------------------------------------------------------------------------------- checkpoints
    @property
    def primary_metric(self) -> str:
        return "AP" if self.cfg.task == "det" else "top1"

    def state(self) -> dict[str, Any]:
        _, opt_rest = flatten_optimizer(self.optimizer)
        _, rng_js = _rng_state(self.device)
        g = self.cfg.global_batch
        st = {"model": self.spec, "config": self.cfg.to_dict(), "step": self.step,
              "epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
              # the position in images, independent of the number of processes that consumed them
              "global_batch": g, "world_size": self.world_size, "samples": self.step * g,
              "samples_in_epoch": (self.step % self.steps_per_epoch) * g,
              "scheduler": {"step": self.step, "warmup": self.warmup, "total_steps": self.total_steps,
                            "base_lrs": self.base_lrs},
              "optimizer": opt_rest, "rng": rng_js, "best_metric": self.best, "metric": self.primary_metric,
              "train_seconds": self.train_seconds, "warmup_seconds": self.warmup_seconds,
              "last_eval": self.last_eval}
        if self.ema is not None:
            e = self.ema.state_dict()
            st["ema"] = {k: e[k] for k in ("decay", "warmup", "num_updates")}
        if self.scaler is not None:
            st["scaler"] = self.scaler.state_dict()
        return st

    def save(self, name: str = "last") -> Path | None:
        """Rank 0 writes ``NAME.safetensors`` (the plain model's state_dict: no DDP ``module.`` prefix); every
        rank calls it and waits at a barrier until the file is complete, so a peer failing later cannot
        interrupt a write."""
        path = None
        if self.main:
            opt_t, _ = flatten_optimizer(self.optimizer)
            rng_t, _ = _rng_state(self.device)
            groups = {"model": self.model.state_dict(), "optim": opt_t, "rng": rng_t}
            if self.ema is not None:
                groups["ema"] = self.ema.shadow
            path = save_checkpoint(self.run_dir / f"{name}.safetensors", groups, self.state())
        barrier()
        return path

    def _restore(self, ck) -> None:
        st = ck.state
        if st["model"].get("backbone") != self.spec["backbone"] or \
                st["model"].get("num_classes") != self.spec["num_classes"]:
            raise CheckpointError(f"{ck.path}: is for {describe(st['model'])}, not {describe(self.spec)}")
        load_state(self.model, ck.tensors("model"), ck.path, st["model"])
        try:
            self.optimizer.load_state_dict(unflatten_optimizer(ck.tensors("optim"), st["optimizer"]))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{ck.path}: optimizer state does not fit this run: {e}") from None
        if self.ema is not None:
            if "ema" not in st:
                raise CheckpointError(f"{ck.path}: the run uses EMA but the checkpoint has no averaged weights")
            self.ema.load_state_dict(dict(st["ema"], shadow=ck.tensors("ema")))
        if self.scaler is not None and "scaler" in st:
            self.scaler.load_state_dict(st["scaler"])
        self.step = int(st["step"])
        self.base_lrs = list(st["scheduler"].get("base_lrs", self.base_lrs))
        self.warmup = int(st["scheduler"].get("warmup", self.warmup))
        self.best = st.get("best_metric")
        self.train_seconds = float(st.get("train_seconds", 0.0))
        self.warmup_seconds = float(st.get("warmup_seconds", 0.0))
        self.last_eval = st.get("last_eval") or {}
        _set_rng_state(ck.tensors("rng"), st.get("rng", {}))
        self.resumed_from = ck.path
        csv_path = self.run_dir / "metrics.csv"
        if csv_path.is_file():
            with open(csv_path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r.get("step") or 0)) <= self.step]

    # ----------------------------------------------------------------------------------- one step
    def _autocast(self):
        if self.cfg.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16)

    def compute_loss(self, batch) -> tuple[Tensor, dict[str, float], int]:
        """(total loss, its parts as floats, number of images) of one batch."""
        dev = self.device
        if self.cfg.task == "det":
            images, targets = batch
            images = [im.as_subclass(Tensor).to(dev, non_blocking=True) for im in images]
            if all(im.shape == images[0].shape for im in images):
                images = torch.stack(images)
            targets = [_plain_target(t, dev) for t in targets]
            m = self.model
            if hasattr(m, "compute_loss") and hasattr(m, "net"):
                # the network under autocast, the loss (matching, focal loss) in float32
                m._check_targets(targets)
                b, targets = m.transform(images, targets, size=self.train_size())
                with self._autocast():
                    levels = m.net.pyramid(b.tensor)
                    cls, box = m.net.head(levels)
                anchors, per_level = m.anchors_for(b.tensor, levels)
                losses = m.compute_loss(cls.float(), box.float(), anchors, targets, anchors_per_level=per_level)
            else:
                with self._autocast():
                    losses = m(images, targets)
            total = sum(losses.values())
            n = len(targets)
            parts = {k: v.detach() for k, v in losses.items()}
        else:
            x, y = batch
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            size = self.train_size()
            if size is not None:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=size < x.shape[-1])
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                out = self.model(x)
            if isinstance(out, (tuple, list)):
                out = [o.float() for o in out]
                total = techniques.aux_loss(tuple(out), y, self.aux_weight, self.criterion)
                parts = {"main": self.criterion(out[0].detach(), y)}
            else:
                total = self.criterion(out.float(), y)
                parts = {}
            n = len(y)
        return total, parts, n

    def schedule_fraction(self) -> float:
        """How far the run is through its schedule, 0..1: the time budget used with ``schedule_on_time``, else
        the steps done."""
        if self.cfg.schedule_on_time and self.cfg.max_minutes:
            return min(1.0, self.train_seconds / (60 * self.cfg.max_minutes))
        return min(1.0, self.step / max(1, self.total_steps))

    def train_size(self) -> int | None:
        """The input size of the next training step under ``cfg.progressive`` (None: the run's size)."""
        return self.cfg.progressive_size(self.schedule_fraction()) if self.cfg.progressive else None

    def _nonfinite(self, what: str, value: float, parts: dict[str, float]) -> NonFiniteLossError:
        last = self.run_dir / "last.safetensors"
        have = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        detail = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        return NonFiniteLossError(
            f"{what} is {value} at step {self.step + 1} (epoch {self.step // self.steps_per_epoch + 1})"
            f"{' (' + detail + ')' if detail else ''}; training stopped before the update and {have}. "
            "Try a lower --lr, a longer warm-up, --clip, or no --amp fp16."
        )

    def train_step(self, batch) -> tuple[float, dict[str, float], int]:
        """One optimizer step over ``batch``: a batch, or a list of ``accum_steps`` micro-batches whose
        gradients are accumulated (averaged: each micro-batch's loss is divided by their number). With several
        processes the gradients are averaged over them too (DDP, synchronised on the last micro-batch only).
        Returns (loss, its parts, images) over every micro-batch of every process."""
        batches = list(batch) if isinstance(batch, list) else [batch]
        frac = None
        if self.cfg.schedule_on_time and self.cfg.max_minutes:
            if self.step <= self.warmup:
                self.warmup_seconds = self.train_seconds  # the cosine spans the budget left after warm-up
            left = 60 * self.cfg.max_minutes - self.warmup_seconds
            frac = min(1.0, max(0.0, (self.train_seconds - self.warmup_seconds) / max(left, 1e-9)))
        factor = lr_factor(self.step, self.cfg, self.steps_per_epoch, self.total_steps, self.warmup, frac)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor
        (self.ddp or self.model).train()
        self.optimizer.zero_grad(set_to_none=True)
        k = len(batches)
        keys: list[str] = []
        sums: Tensor | None = None
        n = 0
        for i, b in enumerate(batches):
            no_sync = self.ddp.no_sync() if self.ddp is not None and i < k - 1 else contextlib.nullcontext()
            with no_sync:
                total, parts, n_i = self.ddp(b) if self.ddp is not None else self.compute_loss(b)
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
            if self.cfg.clip:
                self.scaler.unscale_(self.optimizer)
                techniques.clip_gradients(self.model, self.cfg.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.cfg.clip:
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
        from ..data import collate_classification, collate_detection

        collate = collate_detection if self.cfg.task == "det" else collate_classification
        ds = self.val_set
        if self.world_size > 1:  # this rank's share: every W-th image (no padding, so nothing counts twice)
            ds = torch.utils.data.Subset(ds, range(self.rank, len(ds), self.world_size))
        return DataLoader(ds, batch_size=self.cfg.batch, shuffle=False, num_workers=self.cfg.workers,
                          collate_fn=collate)

    def evaluate(self, breakdown: bool = False) -> dict[str, float]:
        """The validation metrics (detection with ``breakdown``: also per class and class-agnostic, see
        :func:`~vertebra.engine.evaluate.coco_evaluate`). With several processes each evaluates its share of
        the set with rank 0's BatchNorm statistics (and running average), rank 0 computes the metrics from
        every rank's predictions and every rank returns them: the numbers of one process evaluating the checkpoint."""
        if self.val_set is None:
            return {}
        dist = self.world_size > 1
        if dist:
            broadcast_tensors(list(self.model.buffers()))
            if self.ema is not None:
                broadcast_tensors(list(self.ema.shadow.values()))
        ctx = self.ema.applied_to(self.model) if self.ema is not None else contextlib.nullcontext()
        with ctx:
            if self.cfg.task == "det":
                m = evaluate_detector(self.model, self._val_loader(), self.val_set, self.device, self.cfg.amp,
                                      voc=self.voc, distributed=dist, breakdown=breakdown)
            else:
                m = evaluate_classifier(self.model, self._val_loader(), self.device, self.cfg.amp, distributed=dist)
        self.last_eval = m
        return m

    # ----------------------------------------------------------------------------------- records
    def _write_metrics(self) -> None:
        if not self.main or not self.rows:
            return
        fields: list[str] = []
        for r in self.rows:
            for k in r:
                if k not in fields:
                    fields.append(k)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())

    def _plot(self) -> None:
        if not self.main or not self.rows:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover
            return
        tr = [r for r in self.rows if r.get("kind") == "train" and r.get("loss") not in (None, "")]
        ev = [r for r in self.rows if r.get("kind") == "eval" and r.get(self.primary_metric) not in (None, "")]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if tr:
            ax.plot([float(r["step"]) for r in tr], [float(r["loss"]) for r in tr], label="train loss", color="C0")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ev:
            ax2 = ax.twinx()
            ax2.plot([float(r["step"]) for r in ev], [float(r[self.primary_metric]) for r in ev], "o-", color="C1",
                     label=f"val {self.primary_metric}")
            ax2.set_ylabel(f"val {self.primary_metric}")
            ax2.legend(loc="upper right")
        ax.legend(loc="upper left")
        ax.set_title(f"{self.spec['backbone']} ({self.cfg.task})")
        fig.tight_layout()
        tmp = self.run_dir / ".loss.png.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(self.run_dir / "loss.png")

    def _print(self, msg: str) -> None:
        if not self.main:
            return
        if self.console is not None:
            self.console.print(msg)
        elif self.cfg.progress:
            print(msg, flush=True)
        else:
            log.info(msg)

    # ----------------------------------------------------------------------------------- the loop
    def _train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        from ..data import collate_classification, collate_detection

        # resuming mid-epoch: start_batch optimizer steps of global_batch images are done; this rank's share
        self.sampler.set_epoch(epoch, start_batch * self.cfg.global_batch // self.world_size)
        collate = collate_detection if self.cfg.task == "det" else collate_classification
        return DataLoader(SeededDataset(self.train_set), batch_size=self.cfg.batch, sampler=self.sampler,
                          num_workers=self.cfg.workers, collate_fn=collate, drop_last=self.drop_last,
                          generator=self.loader_gen, persistent_workers=False,
                          pin_memory=self.device.type == "cuda")

    def _progress(self):
        if not (self.main and self.cfg.progress):
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                                   "{task.fields[ips]:.1f} img/s"), TimeElapsedColumn(), console=self.console)

    def _micro_batches(self, loader) -> Iterator[Any]:
        """The loader's batches, grouped by ``accum_steps`` (one batch as it is without accumulation)."""
        k = self.cfg.accum_steps
        if k == 1:
            yield from loader
            return
        group: list[Any] = []
        for b in loader:
            group.append(b)
            if len(group) == k:
                yield group
                group = []
        if group:
            yield group

    def _agreed_seconds(self, seconds: float) -> float:
        """Rank 0's training time on every rank: the time budget, time-based evaluation and a schedule on time
        then take the same decisions (and learning rate) everywhere."""
        if self.world_size == 1:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        broadcast_tensors([t])
        return float(t)

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to ``max_steps`` / ``max_minutes``); returns a summary."""
        cfg = self.cfg
        spe = self.steps_per_epoch
        start_epoch, start_batch = divmod(self.step, spe)
        progress = self._progress()
        last_eval_t = self.train_seconds
        win_loss: list[float] = []
        win_parts: dict[str, list[float]] = {}
        win_imgs, win_t = 0, 0.0
        stop = False
        if self.step >= self.total_steps:
            self.stop_reason = "already finished"
        ctx = progress if progress is not None else contextlib.nullcontext()
        with ctx:
            task = progress.add_task("train", total=spe, epoch=0, loss=float("nan"), lr=0.0, ips=0.0) \
                if progress is not None else None
            for epoch in range(start_epoch, cfg.epochs):
                if stop:
                    break
                sb = start_batch if epoch == start_epoch else 0
                if task is not None:
                    progress.reset(task, total=spe, completed=sb)
                    progress.update(task, epoch=f"{epoch + 1}/{cfg.epochs}")
                t_fetch = time.perf_counter()
                for batch in self._micro_batches(self._train_loader(epoch, sb)):
                    loss, parts, n = self.train_step(batch)
                    dt_all = time.perf_counter() - t_fetch
                    t_fetch = time.perf_counter()
                    self.train_seconds = self._agreed_seconds(self.train_seconds + dt_all)
                    win_loss.append(loss)
                    for k, v in parts.items():
                        win_parts.setdefault(k, []).append(v)
                    win_imgs += n
                    win_t += dt_all
                    ips = n / max(dt_all, 1e-9)
                    lr = self.optimizer.param_groups[0]["lr"]
                    if task is not None:
                        progress.update(task, advance=1, loss=loss, lr=lr, ips=ips)
                        if not progress.console.is_terminal and self.step % (10 * cfg.log_every) == 0:
                            r = self.rows[-1] if self.rows else {}
                            progress.console.print(
                                f"step {self.step} (epoch {self.step / spe:.2f}): loss {r.get('loss', loss):.4f}"
                                f"  lr {lr:.2e}  {r.get('images_per_s', ips):.2f} img/s  "
                                f"{self.train_seconds / 60:.1f} min")
                    if self.step % cfg.log_every == 0 or self.step % spe == 0:
                        row = {"kind": "train", "epoch": round(self.step / spe, 4), "step": self.step,
                               "loss": float(np.mean(win_loss))}
                        row.update({f"loss_{k}": float(np.mean(v)) for k, v in win_parts.items()})
                        row.update({"lr": lr, "images_per_s": win_imgs / max(win_t, 1e-9),
                                    "train_minutes": self.train_seconds / 60})
                        self.rows.append(row)
                        win_loss, win_parts, win_imgs, win_t = [], {}, 0, 0.0
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save("last")
                    if cfg.eval_every_minutes and self.train_seconds - last_eval_t >= 60 * cfg.eval_every_minutes:
                        self._eval_and_record(epoch)
                        last_eval_t = self.train_seconds
                        t_fetch = time.perf_counter()
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        self.stop_reason, stop = f"reached max_steps {cfg.max_steps}", True
                    elif cfg.max_minutes is not None and self.train_seconds >= 60 * cfg.max_minutes:
                        self.stop_reason, stop = f"reached the time budget ({cfg.max_minutes:g} min)", True
                    if stop:
                        break
                epoch_done = self.step % spe == 0
                if epoch_done and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    self._eval_and_record(epoch)
                    last_eval_t = self.train_seconds
                self.save("last")
                self._write_metrics()
                self._plot()
        if not self.stop_reason:
            self.stop_reason = f"finished {cfg.epochs} epochs"
        summary = {"steps": self.step, "epochs": self.step / spe, "train_minutes": self.train_seconds / 60,
                   "best_metric": self.best, "metric": self.primary_metric, "last_eval": self.last_eval,
                   "run_dir": str(self.run_dir), "stop_reason": self.stop_reason, "skipped": self.skip_summary()}
        barrier()  # the job ends together, after rank 0's last writes
        self._print(f"{self.stop_reason}: {self.step} steps in {self.train_seconds / 60:.1f} min; "
                    f"checkpoint {self.run_dir / 'last.safetensors'}")
        for line in self.skip_summary():
            self._print(line)
        return summary

    def skip_summary(self) -> list[str]:
        out = []
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            skipped = getattr(ds, "skipped", None)
            if skipped:
                reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items())
                note = "; counts from the main process only (workers keep their own)" if self.cfg.workers else ""
                out.append(f"{name}: skipped {sum(skipped.values())} ({reasons}){note}")
        return out

    def _eval_and_record(self, epoch: int) -> None:
        if self.val_set is None:
            return
        m = self.evaluate()
        if not m:
            return
        row = {"kind": "eval", "epoch": round(self.step / self.steps_per_epoch, 4), "step": self.step,
               "train_minutes": self.train_seconds / 60}
        row.update({k: v for k, v in m.items() if isinstance(v, (int, float))})
        self.rows.append(row)
        self._write_metrics()
        value = m.get(self.primary_metric)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "eval_seconds")
        self._print(f"eval at step {self.step} (epoch {epoch + 1}): {shown}")
        if value is not None and (self.best is None or value > self.best):
            self.best = float(value)
            self.save("best")


def train(cfg: TrainConfig, resume: bool | str | Path = False, console=None) -> dict[str, Any]:
    """Train with ``cfg``; returns the summary of :meth:`Trainer.fit`."""
    trainer = Trainer(cfg, resume=resume, console=console)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def dump_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
