"""ZFNet: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks" (ECCV 2014,
arXiv 1311.2901), the network of Fig. 3 (labelled Fig. 2 in the earliest arXiv version).

AlexNet as the paper's visualisations corrected it, trained on one GPU:

- conv1: 96 filters **7x7 stride 2** (AlexNet: 11x11/4) -> 110x110, ReLU, 3x3/2 max-pool -> 55,
  contrast normalisation across feature maps;
- conv2: 256 filters 5x5 **stride 2** -> 26, ReLU, 3x3/2 max-pool -> 13, contrast normalisation;
- conv3: 384, conv4: 384, conv5: 256 filters 3x3 (pad 1) -> 13, **dense** (no two-tower groups);
- 3x3/2 max-pool -> 6x6x256, fc6 4096, fc7 4096 (dropout 0.5), fc8 1000.

Parameters: 62,357,608 (the paper gives no count; this equals imgclsmob's ``zfnet``).

Choices the paper leaves open, made so the sizes of Fig. 3 come out at 224x224:

- conv1 pads 1 (224 -> 110) and conv2 pads 0 (55 -> 26);
- the max-pools round up (Caffe-style ``ceil_mode``): 110 -> 55 and 26 -> 13 (floor gives 54, 12);
- "contrast normalisation across feature maps" is not parametrised in the paper; it is AlexNet's
  cross-map response normalisation here (n=5, alpha=1e-4 on the raw sum of squares, beta=0.75,
  k=2; see ``alexnet.py``), applied after the pool as Fig. 3's caption orders it.

Initialisation (Sec. 3): "all weights are initialized to 1e-2 and biases are set to 0", read as
N(0, 0.01) weights. The paper's training also renormalises any conv filter whose RMS exceeds
0.1; that is a training-loop step, not part of the network, and is not done here.

Reported (earliest arXiv version, Table 2, "1 convnet as per Fig. 2"): ImageNet 2012 validation
top-1 38.3%, top-5 16.4%, test top-5 16.5%. (The final version's Table 2 reads 38.4 / 16.5 for
the same model according to the facts table; not checked here.)

Features: conv1 (96, stride 2, after ReLU), pool1 (96, stride 4, after the normalisation),
conv2 (256, stride 8), conv5 (256, stride 16), pool5 (256, stride 32). The classifier sits behind
an adaptive average pool to 6x6 (the identity at 224), so any input of at least 47x47 works.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo
from ..layers import FCHead, conv_relu, lrn
from ..registry import register

__all__ = ["ZFNet"]


class ZFNet(Backbone):
    """The Fig. 3 network."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.5) -> None:
        super().__init__(in_chans, num_classes)
        self.min_input_size = 47
        self.conv1 = conv_relu(in_chans, 96, 7, 2, 1)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.lrn1 = lrn()
        self.conv2 = conv_relu(96, 256, 5, 2, 0)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.lrn2 = lrn()
        self.conv3 = conv_relu(256, 384, 3, 1, 1)
        self.conv4 = conv_relu(384, 384, 3, 1, 1)
        self.conv5 = conv_relu(384, 256, 3, 1, 1)
        self.pool5 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.stage_info = [FeatureInfo("conv1", 96, 2), FeatureInfo("pool1", 96, 4), FeatureInfo("conv2", 256, 8),
                             FeatureInfo("conv5", 256, 16), FeatureInfo("pool5", 256, 32)]
        self.head = FCHead(256, num_classes, pool_size=6, hidden=4096, drop_rate=drop_rate)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def stages(self, x: Tensor):
        x = self.conv1(x)
        yield x
        x = self.lrn1(self.pool1(x))
        yield x
        x = self.conv2(x)
        yield x
        x = self.conv5(self.conv4(self.conv3(self.lrn2(self.pool2(x)))))
        yield x
        yield self.pool5(x)


@register("zfnet", family="ZFNet", paper="Visualizing and Understanding Convolutional Networks (ECCV 2014)",
          year=2013, arxiv="1311.2901", supports_drop_path=False)
def zfnet(**kw) -> ZFNet:
    return ZFNet(**kw)
