"""Process-group helpers. vertebra trains in one process today; these are the single places the engine
asks "am I the process that writes files / draws the progress bar?" and "how many processes share the
data?", so that torchrun / DDP can be plugged in without touching the training loop."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_distributed", "get_rank", "get_world_size", "is_main_process"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True in the process that writes checkpoints, metrics, plots and draws the progress bar."""
    return get_rank() == 0
