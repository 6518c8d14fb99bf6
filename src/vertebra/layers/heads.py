"""The classifier head most classic nets share: global average pool, dropout, linear."""

from __future__ import annotations

from torch import Tensor, nn


class ClassifierHead(nn.Module):
    """``adaptive avg pool -> flatten -> dropout -> fc`` (the classifier is ``fc``)."""

    def __init__(self, in_ch: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.pool(x).flatten(1)))
