"""The fully-connected classifier of AlexNet, ZFNet and VGG: fc6 -> fc7 -> classifier.

``adaptive avg pool (n x n) -> flatten -> fc6 (4096) -> ReLU -> dropout -> fc7 (4096) -> ReLU
-> dropout -> fc``. The adaptive pool makes any input size work (at the paper's size it is an
identity: 6x6 for AlexNet/ZFNet, 7x7 for VGG). ``dropout_first=True`` puts each dropout before
its linear layer instead (torchvision's AlexNet); in eval mode both orders compute the same.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FCHead"]


class FCHead(nn.Module):
    """Two hidden fully-connected layers and the classifier (named ``fc6``, ``fc7``, ``fc``)."""

    def __init__(self, in_ch: int, num_classes: int, pool_size: int = 6, hidden: int = 4096,
                 drop_rate: float = 0.5, dropout_first: bool = False) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc6 = nn.Linear(in_ch * pool_size * pool_size, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.dropout_first = dropout_first

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x).flatten(1)
        if self.dropout_first:
            x = self.act(self.fc6(self.drop(x)))
            x = self.act(self.fc7(self.drop(x)))
            return self.fc(x)
        x = self.drop(self.act(self.fc6(x)))
        x = self.drop(self.act(self.fc7(x)))
        return self.fc(x)
