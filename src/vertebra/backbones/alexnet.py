"""AlexNet: Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional
Neural Networks" (NIPS 2012; no arXiv id), Section 3 and Fig. 2.

``alexnet`` is the paper's network. Its two GPU towers become grouped convolutions:

- conv1: 96 filters 11x11 stride 4 on all three input channels (48 per tower, both towers see
  the whole image, so no groups), ReLU, local response normalisation, overlapping 3x3/2 max-pool;
- conv2: 256 filters 5x5 pad 2, **2 groups** (each tower sees only its own 48 maps), ReLU, LRN,
  3x3/2 max-pool;
- conv3: 384 filters 3x3, connected to all 256 maps of conv2 (the cross-GPU layer);
- conv4: 384 filters 3x3, 2 groups; conv5: 256 filters 3x3, 2 groups, then 3x3/2 max-pool;
- fc6 4096, fc7 4096 (dropout 0.5 on both, Sec. 4.2), fc8 1000; ReLU after every hidden layer.

Parameters: 60,965,224 (the paper says "60 million").

Input size: Fig. 2 says 224x224, but 11x11/4 valid gives 55x55 only from 227x227. This file
pads conv1 by 2 (as torchvision does) so that a 224 input gives the paper's 55 -> 27 -> 13 -> 6
sizes; a 227 input then gives 56 -> 27 -> 13 -> 6. The parameters do not depend on the choice.

LRN: the paper divides by (k + alpha * sum of squares)^beta with k=2, n=5, alpha=1e-4,
beta=0.75 (Sec. 3.3). PyTorch's ``LocalResponseNorm`` (like Caffe) uses alpha / n, so it is
built with alpha = 5 * 1e-4 to compute the paper's formula exactly. (Caffe's bvlc_alexnet
passes 1e-4 to its alpha/n convention: a 5x weaker normalisation than the paper's text.)

Initialisation (Sec. 5): weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6 and fc7, 0 in
the other layers.

Reported (abstract, ILSVRC-2010 test set): top-1 37.5%, top-5 17.0% for one network.

``alexnet_tv`` is torchvision's single-tower AlexNet, the layout of Krizhevsky's "One weird
trick for parallelizing convolutional neural networks" (arXiv 1404.5997): 64-192-384-256-256
filters, no groups, no LRN, dropout before fc6 and fc7 (61,100,840 parameters). It loads
torchvision's ``alexnet`` weights.

Features: conv1 (after ReLU and LRN, stride 4), conv2 (ReLU, LRN; stride 8), conv5 (stride 16)
and pool5 (stride 32). The classifier sits behind an adaptive average pool to 6x6 (the
identity at 224), so any input of at least 63x63 works.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo
from ..layers import FCHead, conv_relu, lrn
from ..registry import register

__all__ = ["AlexNet"]

_LAYOUTS = {
    # widths of conv1..conv5, groups of conv1..conv5, LRN
    "paper": ((96, 256, 384, 384, 256), (1, 2, 1, 2, 2), True),
    "torchvision": ((64, 192, 384, 256, 256), (1, 1, 1, 1, 1), False),
}


class AlexNet(Backbone):
    """AlexNet; ``layout="paper"`` (two towers as groups, LRN) or ``"torchvision"``."""

    def __init__(self, layout: str = "paper", num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.5) -> None:
        super().__init__(in_chans, num_classes)
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(_LAYOUTS)}, got {layout!r}")
        (c1, c2, c3, c4, c5), (g1, g2, g3, g4, g5), use_lrn = _LAYOUTS[layout]
        self.min_input_size = 63
        self.conv1 = conv_relu(in_chans, c1, 11, 4, 2, g1)
        self.lrn1 = lrn() if use_lrn else nn.Identity()
        self.pool1 = nn.MaxPool2d(3, 2)
        self.conv2 = conv_relu(c1, c2, 5, 1, 2, g2)
        self.lrn2 = lrn() if use_lrn else nn.Identity()
        self.pool2 = nn.MaxPool2d(3, 2)
        self.conv3 = conv_relu(c2, c3, 3, 1, 1, g3)
        self.conv4 = conv_relu(c3, c4, 3, 1, 1, g4)
        self.conv5 = conv_relu(c4, c5, 3, 1, 1, g5)
        self.pool5 = nn.MaxPool2d(3, 2)
        self.stage_info = [FeatureInfo("conv1", c1, 4), FeatureInfo("conv2", c2, 8), FeatureInfo("conv5", c5, 16),
                             FeatureInfo("pool5", c5, 32)]
        self.head = FCHead(c5, num_classes, pool_size=6, hidden=4096, drop_rate=drop_rate,
                           dropout_first=layout == "torchvision")
        self._init_paper(bias_one=("conv2", "conv4", "conv5", "head.fc6", "head.fc7"))

    def _init_paper(self, bias_one: tuple[str, ...]) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.01)
                owner = name.rsplit(".conv", 1)[0] if name.endswith(".conv") else name
                nn.init.constant_(m.bias, 1.0 if owner in bias_one else 0.0)

    def stages(self, x: Tensor):
        x = self.lrn1(self.conv1(x))
        yield x
        x = self.lrn2(self.conv2(self.pool1(x)))
        yield x
        x = self.conv5(self.conv4(self.conv3(self.pool2(x))))
        yield x
        yield self.pool5(x)


_PAPER = dict(family="AlexNet", paper="ImageNet Classification with Deep Convolutional Neural Networks (NIPS 2012)",
              year=2012, supports_drop_path=False)


@register("alexnet", **_PAPER, layout="paper")
@register("alexnet_tv", **_PAPER, layout="torchvision")
def alexnet(**kw) -> AlexNet:
    return AlexNet(**kw)
