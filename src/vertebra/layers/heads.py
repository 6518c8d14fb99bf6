"""The classifier heads several families share.

- :class:`ClassifierHead`: global average pool, dropout, linear (most nets since NIN/GoogLeNet);
- :class:`ConvClassifierHead`: a 1x1 conv-BN-act widening first (MobileNetV2's 1280-wide conv,
  MnasNet's, ShuffleNet V2's conv5), then the same;
- :class:`FCHead`: the fully-connected classifier of AlexNet, ZFNet and VGG, fc6 -> fc7 -> fc.

Everything under a network's ``head`` serves classification only (``features_only`` drops it).
Every head is a :class:`ResettableHead`: ``get_classifier()``, ``reset(num_classes)`` (a fresh classifier;
0 leaves the pooled features), ``num_features`` (the width the classifier reads) and
``forward(x, pre_logits=False)``: what ``Backbone.get_classifier`` / ``reset_classifier`` / ``forward_head`` use.
"""

from __future__ import annotations

from torch import Tensor, nn

from .conv_bn import ConvBnAct

__all__ = ["ClassifierHead", "ConvClassifierHead", "FCHead", "ResettableHead"]


class ResettableHead(nn.Module):
    """A head whose classifier is the child ``classifier_name`` (``fc``), reading ``num_features`` values.

    ``reset(num_classes)`` replaces it by :meth:`make_classifier` (a fresh ``nn.Linear``; ``nn.Identity`` for
    0), on the device and in the dtype of the head's parameters."""

    classifier_name = "fc"
    num_features: int

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        ref = next(iter(self.get_classifier().parameters()), None)
        if ref is None:
            ref = next(iter(self.parameters()), None)
        new = self.make_classifier(int(num_classes))
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        setattr(self, self.classifier_name, new)


class ClassifierHead(ResettableHead):
    """``adaptive avg pool -> flatten -> dropout -> fc`` (the classifier is ``fc``)."""

    def __init__(self, in_ch: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_features = in_ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)


class ConvClassifierHead(ResettableHead):
    """``1x1 conv -> BN -> act`` to ``width`` channels, then pool, dropout, linear (``conv``, ``fc``)."""

    def __init__(self, in_ch: int, width: int, num_classes: int, drop_rate: float = 0.0,
                 act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.num_features = width
        self.conv = ConvBnAct(in_ch, width, 1, act=act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(self.conv(x)).flatten(1))
        return x if pre_logits else self.fc(x)


class FCHead(ResettableHead):
    """Two hidden fully-connected layers and the classifier (named ``fc6``, ``fc7``, ``fc``).

    ``adaptive avg pool (n x n) -> flatten -> fc6 (4096) -> ReLU -> dropout -> fc7 (4096) -> ReLU
    -> dropout -> fc``. The adaptive pool makes any input size work (at the paper's size it is an
    identity: 6x6 for AlexNet/ZFNet, 7x7 for VGG). ``dropout_first=True`` puts each dropout before
    its linear layer instead (torchvision's AlexNet); in eval mode both orders compute the same.
    """

    def __init__(self, in_ch: int, num_classes: int, pool_size: int = 6, hidden: int = 4096,
                 drop_rate: float = 0.5, dropout_first: bool = False) -> None:
        super().__init__()
        self.num_features = hidden
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc6 = nn.Linear(in_ch * pool_size * pool_size, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.dropout_first = dropout_first

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x).flatten(1)
        if self.dropout_first:
            x = self.act(self.fc6(self.drop(x)))
            x = self.act(self.fc7(self.drop(x)))
        else:
            x = self.drop(self.act(self.fc6(x)))
            x = self.drop(self.act(self.fc7(x)))
        return x if pre_logits else self.fc(x)
