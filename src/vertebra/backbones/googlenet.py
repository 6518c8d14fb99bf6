"""GoogLeNet (Inception v1): Szegedy et al., "Going Deeper with Convolutions" (CVPR 2015,
arXiv 1409.4842).

``googlenet`` is the paper's network (Table 1, Fig. 3): a 7x7/2 convolution, 3x3/2 max-pool,
local response normalisation, a 1x1 (64) + 3x3 (192) convolution pair, LRN, 3x3/2 max-pool,
then nine Inception modules (3a-3b, pool, 4a-4e, pool, 5a-5b), each four parallel branches
concatenated: 1x1; 1x1 reduce -> 3x3; 1x1 reduce -> **5x5**; 3x3/1 max-pool -> 1x1 projection.
Every convolution has a bias and a ReLU and there is no BatchNorm (2014). The head is a global
average pool, dropout 0.4 and a linear classifier. Pools use ceil rounding as in the Caffe
release. 6.999M parameters with 1000 classes (6.990M weights, 9k biases). Table 1's "params"
column sums to about 6.8M, but several of its rows are below the exact count of the layers the
same table lists (conv1 2.7K vs 9.4K for 7x7x3x64, 4c 463K vs 509K, 5b 1388K vs 1443K): the
2.9% gap is the table's rounding, not a different structure.

Auxiliary classifiers (Sec. 5): on the outputs of 4a and 4d, each 5x5/3 average pool, 1x1
convolution (128) + ReLU, FC 1024 + ReLU, dropout 0.7, linear. Built only with
``aux_logits=True``; in train mode ``forward`` returns ``(logits, aux_4a, aux_4d)``. The paper
adds their losses with weight 0.3 (``vertebra.engine.techniques.aux_loss``) and discards them at
inference. The 5x5/3 pool gives 4x4 on the 14x14 map of a 224x224 input; on any other map
size an adaptive pool to 4x4 takes its place, so every input at or above the minimum runs.

``googlenet_tv`` is torchvision's layout (a port of TF-slim's inception_v1): BatchNorm
(eps 1e-3) after every bias-free convolution, no LRN, a **3x3** kernel in the "5x5" branch,
a 2x2 max-pool before 5a, adaptive 4x4 pools in the auxiliary heads. Its weights load from
torchvision's ``googlenet`` with ``load_reference_weights`` (auxiliary weights too, into a model
built with ``aux_logits=True``). torchvision's pretrained GoogLeNet runs with
``transform_input=True``, which re-maps ImageNet-normalised input to the TF range [-1, 1];
vertebra has no such flag: normalise with mean = std = 0.5 to use those weights.

Features: conv1 (64, s2), conv3 (192, s4, after the LRN in the paper net), inception3b
(480, s8), inception4e (832, s16), inception5b (1024, s32).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import FeatureInfo, init_weights
from ..layers import ClassifierHead, ConvBnAct
from ..layers.heads import ResettableHead
from ..layers.inception import AuxBackbone, Concat, cbr
from ..registry import register

_GOOGLENET = dict(family="Inception", paper="Going Deeper with Convolutions (CVPR 2015)", year=2014,
                  arxiv="1409.4842", supports_drop_path=False)

# Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj)
_CFG = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def _conv_factory(bn: bool):
    if bn:
        return cbr
    return lambda i, o, k=1, s=1, p=0: ConvBnAct(i, o, k, s, p, bias=True, bn=False)


def inception_v1_module(in_ch: int, cfg, bn: bool) -> Concat:
    c1, r3, c3, r5, c5, pp = cfg
    conv = _conv_factory(bn)
    k5 = 3 if bn else 5  # torchvision/TF-slim put a 3x3 in the "5x5" branch
    return Concat(
        conv(in_ch, c1, 1),
        nn.Sequential(conv(in_ch, r3, 1), conv(r3, c3, 3, p=1)),
        nn.Sequential(conv(in_ch, r5, 1), conv(r5, c5, k5, p=k5 // 2)),
        nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), conv(in_ch, pp, 1)),
    )


class GoogLeNetAux(ResettableHead):
    """Auxiliary classifier: 5x5/3 avg pool (4x4 out at 14x14), 1x1 conv 128, FC 1024, dropout, FC (``fc2``)."""

    classifier_name = "fc2"
    num_features = 1024

    def __init__(self, in_ch: int, num_classes: int, bn: bool, drop_rate: float = 0.7, adaptive: bool = False):
        super().__init__()
        self.adaptive = adaptive
        self.conv = _conv_factory(bn)(in_ch, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if not self.adaptive and tuple(x.shape[-2:]) == (14, 14):
            x = F.avg_pool2d(x, 5, 3)  # the paper's pool at 224x224 input
        else:
            x = F.adaptive_avg_pool2d(x, 4)
        x = self.conv(x).flatten(1)
        return self.fc2(self.drop(F.relu(self.fc1(x), inplace=True)))


class GoogLeNet(AuxBackbone):
    """GoogLeNet; ``layout="paper"`` (LRN, 5x5, biases) or ``"torchvision"`` (BN, 3x3)."""

    def __init__(self, layout: str = "paper", num_classes: int = 1000, in_chans: int = 3, aux_logits: bool = False,
                 drop_rate: float = 0.4, aux_drop_rate: float = 0.7):
        super().__init__(in_chans, num_classes)
        if layout not in ("paper", "torchvision"):
            raise ValueError(f"layout must be 'paper' or 'torchvision', got {layout!r}")
        bn = layout == "torchvision"
        conv = _conv_factory(bn)
        self.conv1 = conv(in_chans, 64, 7, 2, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        # Caffe LRN: size 5, alpha 1e-4, beta 0.75, k 1 (alpha divided by size, as here)
        self.lrn1 = nn.Identity() if bn else nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)
        self.conv2 = conv(64, 64, 1)
        self.conv3 = conv(64, 192, 3, p=1)
        self.lrn2 = nn.Identity() if bn else nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        in_ch = 192
        for name, cfg in _CFG.items():
            self.add_module(f"inception{name}", inception_v1_module(in_ch, cfg, bn))
            in_ch = cfg[0] + cfg[2] + cfg[4] + cfg[5]
            if name == "3b":
                self.pool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
            if name == "4e":
                self.pool4 = nn.MaxPool2d(2, 2, ceil_mode=True) if bn else nn.MaxPool2d(3, 2, ceil_mode=True)
        self.stage_info = [FeatureInfo("conv1", 64, 2), FeatureInfo("conv3", 192, 4),
                             FeatureInfo("inception3b", 480, 8), FeatureInfo("inception4e", 832, 16),
                             FeatureInfo("inception5b", 1024, 32)]
        self.aux_heads = None
        if aux_logits:
            self.aux_heads = nn.ModuleList([GoogLeNetAux(512, num_classes, bn, aux_drop_rate, adaptive=bn),
                                            GoogLeNetAux(528, num_classes, bn, aux_drop_rate, adaptive=bn)])
        self.head = ClassifierHead(1024, num_classes, drop_rate)
        init_weights(self)

    def _stages(self, x: Tensor, aux: list | None):
        x = self.conv1(x)
        yield x
        x = self.lrn2(self.conv3(self.conv2(self.lrn1(self.pool1(x)))))
        yield x
        x = self.inception3b(self.inception3a(self.pool2(x)))
        yield x
        x = self.inception4a(self.pool3(x))
        self._aux(0, x, aux)
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        self._aux(1, x, aux)
        x = self.inception4e(x)
        yield x
        yield self.inception5b(self.inception5a(self.pool4(x)))


@register("googlenet", **_GOOGLENET, layout="paper")
@register("googlenet_tv", **_GOOGLENET, layout="torchvision")
def googlenet(**kw) -> GoogLeNet:
    return GoogLeNet(**kw)
