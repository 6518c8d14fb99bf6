"""Process groups for training across processes and machines (torchrun + DistributedDataParallel).

``vertebra train`` under ``torchrun --nproc_per_node N [--nnodes M ...] -m vertebra train ...`` finds
``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` in its environment and
:func:`init_distributed` joins the process group: gloo on CPU, nccl on CUDA, one device per process
(``cuda:LOCAL_RANK``). Without that environment (or with ``WORLD_SIZE=1``) everything here is a no-op and
the engine runs in one process.

The rest are the single places the engine asks "am I the process that writes files / draws the
progress bar?" (:func:`is_main_process`), "how many processes share the data?" and the few collectives
it uses (barrier, gather / broadcast of Python objects, sums), each of which is the identity in one
process. :class:`SyncBatchNorm` is a BatchNorm whose batch statistics are over every process's batch
and which, unlike ``torch.nn.SyncBatchNorm``, also runs on CPU (gloo).
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["is_distributed", "get_rank", "get_world_size", "is_main_process", "DistInfo", "env_world_size",
           "init_distributed", "cleanup_distributed", "barrier", "all_gather_object", "broadcast_object",
           "all_reduce_sum", "broadcast_tensors", "SyncBatchNorm", "convert_sync_batchnorm", "rank_label"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True in the process that writes checkpoints, metrics, plots and draws the progress bar."""
    return get_rank() == 0


def rank_label() -> str:
    """``"rank R of W"`` in a distributed run (for error messages), ``""`` otherwise."""
    if is_distributed():
        return f"rank {get_rank()} of {get_world_size()}"
    w = env_world_size()
    return f"rank {os.environ.get('RANK', '?')} of {w}" if w > 1 else ""


# --------------------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    backend: str | None  # None: one process, no process group
    device: torch.device


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun sets it), 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_distributed(device: str = "cpu", backend: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes in the environment and pick this process's device.

    ``device``: ``cpu`` or ``cuda`` (``cuda:N`` must be ``cuda:LOCAL_RANK``: each process drives the GPU of
    its local rank). ``backend``: ``gloo`` / ``nccl``, None for gloo on CPU and nccl on CUDA.
    ``timeout_minutes`` bounds every collective, so a dead peer stops the job instead of hanging it.
    In one process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing is initialised. Already initialised
    (a caller set the group up itself): the group is used as it is.
    """
    dev = torch.device(device)
    world = env_world_size()
    if is_distributed():
        world = dist.get_world_size()
    if world <= 1 and not is_distributed():
        if backend is not None:
            raise ValueError(f"--dist-backend {backend} needs several processes: launch with "
                             "torchrun --nproc_per_node N -m vertebra train ...")
        return DistInfo(0, 0, 1, None, dev)
    if not is_distributed():
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                             "(torchrun --nproc_per_node N -m vertebra train|eval ...), which sets them")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        from ..devices import check_device

        check_device(device)
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"LOCAL_RANK {local_rank} but this machine has {n} CUDA device(s): "
                             "--nproc_per_node must not exceed the GPUs per machine")
        if dev.index is not None and dev.index != local_rank and world > 1:
            raise ValueError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK "
                             f"(this one cuda:{local_rank}); give --device cuda")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {dev.type}")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"--dist-backend must be gloo or nccl, got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices (--device cuda); on CPU use gloo")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError("this PyTorch build has no NCCL; use --dist-backend gloo")
    if not is_distributed():
        _exit_with_launcher()
        kw: dict[str, Any] = {"timeout": datetime.timedelta(minutes=float(timeout_minutes))}
        if backend == "nccl":
            kw["device_id"] = dev
        dist.init_process_group(backend=backend, **kw)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dist.get_backend(), dev)


def _exit_with_launcher(poll_seconds: float = 1.0) -> None:
    """Under torchrun, stop this process when the launcher dies (a ``kill -9`` of the job's main process):
    torchrun starts each worker in its own session, so nothing else would, and the ranks would train on,
    unsupervised. A daemon thread watches the parent process id."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                print(f"vertebra ({rank_label() or 'worker'}): the torchrun launcher (pid {parent}) is gone; "
                      "stopping", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="vertebra-launcher-watch", daemon=True).start()


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- collectives


def barrier() -> None:
    """Wait for every process (bounded by the process group's timeout); no-op in one process."""
    if is_distributed() and get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` in one process)."""
    if not is_distributed() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not is_distributed() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over the processes, in place (unchanged in one process)."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_tensors(tensors, src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s, in place."""
    if is_distributed() and get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t, src=src)


# --------------------------------------------------------------------------------------------- SyncBatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: D102
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the union of every process's batch (any number of spatial dims), on CPU or CUDA.

    In training with several processes the per-channel mean and (biased) variance come from two
    differentiable all-reduces (the sums and the centred sums of squares), so the output, the gradients and
    the running statistics (updated with the unbiased variance, as ``nn.BatchNorm2d`` does) are those of one
    BatchNorm over the whole global batch. In eval mode, or in one process, it is ``F.batch_norm``. The
    state_dict is a BatchNorm's, so checkpoints load into the plain network.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        sync = self.training and is_distributed() and get_world_size() > 1
        if not sync:
            return super().forward(x)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() // x.shape[1]], dtype=xf.dtype, device=x.device)
        total = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]))
        n = total[-1].detach()
        mean = total[:-1] / n
        centred = xf - mean.reshape(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var.detach() * (n / max(float(n) - 1, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` (not frozen BatchNorms) of ``model`` with :class:`SyncBatchNorm`,
    keeping its parameters, buffers and train/eval mode; returns the model (the same object unless it is a
    BatchNorm itself)."""
    if type(model) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        new = SyncBatchNorm(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats,
                            device=next(iter(model.state_dict().values()), torch.empty(0)).device)
        if model.affine:
            with torch.no_grad():
                new.weight = model.weight
                new.bias = model.bias
        if model.track_running_stats:
            new.running_mean = model.running_mean
            new.running_var = model.running_var
            new.num_batches_tracked = model.num_batches_tracked
        new.train(model.training)
        return new
    for name, child in list(model.named_children()):
        new_child = convert_sync_batchnorm(child)
        if new_child is not child:
            setattr(model, name, new_child)
    return model
