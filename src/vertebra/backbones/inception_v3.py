"""Inception-v3: Szegedy et al., "Rethinking the Inception Architecture for Computer Vision"
(CVPR 2016, arXiv 1512.00567).

The paper's Inception-v3 is its Table 1 network (``inception_v2`` in inception_v2.py) trained
with RMSProp, label smoothing and a BatchNorm-ed auxiliary classifier (Table 3, last row;
21.2% top-1 / 5.6% top-5 single crop at 299x299). What every port implements - TF-slim's
release, torchvision, timm - is the released graph, which this module builds:

- stem (all "VALID" except 2b): conv 3x3/2 32 (149), conv 3x3 32 (147), conv 3x3 64 padded
  (147), max-pool 3x3/2 (73), conv 1x1 80, conv 3x3 192 (71), max-pool 3x3/2 (35);
- 3 Inception-A modules at 35x35 (Mixed_5b/c/d; 1x1, 1x1->5x5, 1x1->3x3->3x3, pool->1x1)
  giving 256/288/288 channels;
- grid reduction Mixed_6a (Fig. 10: a 3x3/2 branch, a 1x1->3x3->3x3/2 branch, max-pool) to
  17x17x768, then 4 Inception-B modules (Fig. 6, n = 7: 1x7/7x1 factorised) with 128, 160,
  160, 192 inner channels;
- grid reduction Mixed_7a to 8x8x1280, then 2 Inception-C modules (Fig. 7: expanded
  1x3 | 3x1 outputs) giving 2048;
- global average pool, dropout 0.5 (TF-slim keep 0.8; torchvision 0.5), linear.

The auxiliary classifier (``aux_logits=True``) sits on Mixed_6e: 5x5/3 average pool, 1x1
conv 128, 5x5 conv 768 (both BN-ReLU: the paper's "BN-auxiliary"), global pool, linear. The
paper does not state its loss weight; TF-slim's training script adds it with weight 0.4
(``vertebra.engine.techniques.aux_loss(..., weights=0.4)``). On maps smaller than 17x17 its
5x5/3 pool becomes an adaptive pool to 5x5, so every input from 75 pixels up runs.

Pool-projection branches average with padding counted (count_include_pad, as torchvision
and timm do). BatchNorm eps 1e-3. Weights load from torchvision's and timm's inception_v3
(the auxiliary head's too, with ``aux_logits=True``). torchvision's pretrained weights run
with ``transform_input=True``, which re-maps ImageNet-normalised input to [-1, 1]; vertebra has
no such flag: normalise with mean = std = 0.5 for them. 23.83M parameters
without the auxiliary head, 27.16M with it; 5.71 GMACs at 299 (the paper: "5 billion
multiply-adds").

Features at 299: Conv2d_2b (64, s2, 147), Conv2d_4a (192, s4, 71), Mixed_5d (288, s8, 35),
Mixed_6e (768, s16, 17), Mixed_7c (2048, s32, 8). The VALID convolutions make the sizes
odd; nothing is cropped. The smallest input that runs is 75x75.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import FeatureInfo, init_weights
from ..layers import ClassifierHead
from ..layers.heads import ResettableHead
from ..layers.inception import (
    AuxBackbone,
    cbr,
    inception_a,
    inception_b,
    inception_c,
    max_pool,
    reduction_17,
    reduction_35,
)
from ..registry import register

_RETHINK = dict(family="Inception", paper="Rethinking the Inception Architecture for Computer Vision (CVPR 2016)",
                year=2015, arxiv="1512.00567")


class InceptionV3Aux(ResettableHead):
    """The BN auxiliary classifier on the 17x17 grid."""

    num_features = 768

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.conv0 = cbr(in_ch, 128, 1)
        self.conv1 = cbr(128, 768, 5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, 5, 3) if min(x.shape[-2:]) >= 17 else F.adaptive_avg_pool2d(x, 5)
        x = self.conv1(self.conv0(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionV3(AuxBackbone):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, aux_logits: bool = False, drop_rate: float = 0.5):
        super().__init__(in_chans, num_classes)
        self.min_input_size = 75
        self.Conv2d_1a_3x3 = cbr(in_chans, 32, 3, 2)
        self.Conv2d_2a_3x3 = cbr(32, 32, 3)
        self.Conv2d_2b_3x3 = cbr(32, 64, 3, p=1)
        self.pool1 = max_pool()
        self.Conv2d_3b_1x1 = cbr(64, 80, 1)
        self.Conv2d_4a_3x3 = cbr(80, 192, 3)
        self.pool2 = max_pool()
        self.Mixed_5b = inception_a(192, 32)
        self.Mixed_5c = inception_a(256, 64)
        self.Mixed_5d = inception_a(288, 64)
        self.Mixed_6a = reduction_35(288)
        self.Mixed_6b = inception_b(768, 128)
        self.Mixed_6c = inception_b(768, 160)
        self.Mixed_6d = inception_b(768, 160)
        self.Mixed_6e = inception_b(768, 192)
        self.Mixed_7a = reduction_17(768)
        self.Mixed_7b = inception_c(1280)
        self.Mixed_7c = inception_c(2048)
        self.stage_info = [FeatureInfo("Conv2d_2b_3x3", 64, 2), FeatureInfo("Conv2d_4a_3x3", 192, 4),
                             FeatureInfo("Mixed_5d", 288, 8), FeatureInfo("Mixed_6e", 768, 16),
                             FeatureInfo("Mixed_7c", 2048, 32)]
        self.aux_heads = nn.ModuleList([InceptionV3Aux(768, num_classes)]) if aux_logits else None
        self.head = ClassifierHead(2048, num_classes, drop_rate)
        init_weights(self)

    def _stages(self, x: Tensor, aux: list | None):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        yield x
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.pool1(x)))
        yield x
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(self.pool2(x))))
        yield x
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        self._aux(0, x, aux)
        yield x
        yield self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))


@register("inception_v3", **_RETHINK, supports_drop_path=False, references=("timm:inception_v3",))
def inception_v3(**kw) -> InceptionV3:
    return InceptionV3(**kw)
