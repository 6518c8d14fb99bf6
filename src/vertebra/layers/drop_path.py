"""Stochastic depth (Huang et al., ECCV 2016): drop a residual branch per sample.

The paper keeps block l of L with probability p_l = 1 - l/L (1 - p_L) and, at test time,
scales each branch by p_l. Here the surviving branches are scaled by 1/p_l during training
instead, which has the same expectation and leaves inference untouched (so weights trained
with or without stochastic depth run the same network at test time).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
    """The paper's linear decay rule: block l (1-based) of L is dropped with rate * l / L."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    return [rate * (i + 1) / num_blocks for i in range(num_blocks)]


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        mask.bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"
