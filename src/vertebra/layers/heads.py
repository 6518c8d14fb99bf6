"""The classifier heads several families share.

- :class:`ClassifierHead`: global average pool, dropout, linear (most nets since NIN/GoogLeNet);
- :class:`ConvClassifierHead`: a 1x1 conv-BN-act widening first (MobileNetV2's 1280-wide conv,
  MnasNet's, ShuffleNet V2's conv5), then the same;
- :class:`FCHead`: the fully-connected classifier of AlexNet, ZFNet and VGG, fc6 -> fc7 -> fc.

Everything under a network's ``head`` serves classification only (``features_only`` drops it).
"""

from __future__ import annotations

from torch import Tensor, nn

from .conv_bn import ConvBnAct

__all__ = ["ClassifierHead", "ConvClassifierHead", "FCHead"]


class ClassifierHead(nn.Module):
    """``adaptive avg pool -> flatten -> dropout -> fc`` (the classifier is ``fc``)."""

    def __init__(self, in_ch: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.pool(x).flatten(1)))


class ConvClassifierHead(nn.Module):
    """``1x1 conv -> BN -> act`` to ``width`` channels, then pool, dropout, linear (``conv``, ``fc``)."""

    def __init__(self, in_ch: int, width: int, num_classes: int, drop_rate: float = 0.0,
                 act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv = ConvBnAct(in_ch, width, 1, act=act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.pool(self.conv(x)).flatten(1)))


class FCHead(nn.Module):
    """Two hidden fully-connected layers and the classifier (named ``fc6``, ``fc7``, ``fc``).

    ``adaptive avg pool (n x n) -> flatten -> fc6 (4096) -> ReLU -> dropout -> fc7 (4096) -> ReLU
    -> dropout -> fc``. The adaptive pool makes any input size work (at the paper's size it is an
    identity: 6x6 for AlexNet/ZFNet, 7x7 for VGG). ``dropout_first=True`` puts each dropout before
    its linear layer instead (torchvision's AlexNet); in eval mode both orders compute the same.
    """

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
