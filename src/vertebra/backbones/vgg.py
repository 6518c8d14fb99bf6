"""VGG: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (ICLR 2015, arXiv 1409.1556), Table 1.

Five blocks of 3x3 stride-1 pad-1 convolutions with ReLU (64, 128, 256, 512, 512 filters), each
followed by a 2x2/2 max-pool, then fc6 4096, fc7 4096 (dropout 0.5 after each, Sec. 3.1) and
the classifier. Convolutions per block, by configuration:

- A, ``vgg11``: 1, 1, 2, 2, 2 (133M parameters in Table 2);
- B, ``vgg13``: 2, 2, 2, 2, 2 (133M);
- D, ``vgg16``: 2, 2, 3, 3, 3 (138M);
- E, ``vgg19``: 2, 2, 4, 4, 4 (144M).

Configuration A-LRN and C (1x1 convolutions) are not built. The paper's net has no
BatchNorm; ``vgg11_bn`` .. ``vgg19_bn`` are the later variant with a BatchNorm after every
convolution (the convolutions keep their bias, as in torchvision), built from ``ConvBnAct`` so
``fold_batchnorm`` folds them. All eight load torchvision's ``vgg*`` weights and give the same
outputs.

The paper evaluates its nets convolutionally (the FC layers turned into 7x7 and 1x1 convs
applied densely, Sec. 3.2); here the classifier sits behind an adaptive average pool to 7x7
(the identity at 224, as in torchvision), so any input of at least 32x32 works.

Initialisation: the paper trained A from N(0, 0.01) weights and initialised the deeper nets
from A, noting that Glorot initialisation works without pre-training. Here every net starts
from He-normal convolutions and N(0, 0.01) linear layers (``init_weights``), which trains all
depths from scratch.

Features, each taken after the ReLU of the last convolution of a block (before its pool):
conv1_2 (64, stride 1), conv2_2 (128, stride 2), conv3_3 (256, stride 4), conv4_3 (512,
stride 8; SSD's tap), conv5_3 (512, stride 16; Faster R-CNN's tap), and pool5 (512, stride 32).
For A/B/E the names follow the block's last convolution (conv1_1 for A's first block, conv5_4
for E).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, init_weights
from ..layers import ConvBnAct, FCHead
from ..registry import register

__all__ = ["VGG", "VGG_CONFIGS"]

#: convolutions per block of each configuration (Table 1), by depth
VGG_CONFIGS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_WIDTHS = (64, 128, 256, 512, 512)


class VGG(Backbone):
    """VGG-11/13/16/19, with or without BatchNorm. Blocks ``block1`` .. ``block5`` hold the
    convolutions ``conv{b}_{i}``; the max-pools are the parameter-free ``pool``."""

    def __init__(self, depth: int = 16, batch_norm: bool = False, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.5) -> None:
        super().__init__(in_chans, num_classes)
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        self.batch_norm = batch_norm
        in_ch = in_chans
        for b, (n, ch) in enumerate(zip(VGG_CONFIGS[depth], _WIDTHS), start=1):
            convs = OrderedDict()
            for i in range(1, n + 1):
                convs[f"conv{b}_{i}"] = ConvBnAct(in_ch, ch, 3, 1, 1, bias=True, bn=batch_norm)
                in_ch = ch
            self.add_module(f"block{b}", nn.Sequential(convs))
            self.stage_info.append(FeatureInfo(f"conv{b}_{n}", ch, 2 ** (b - 1)))
        self.pool = nn.MaxPool2d(2, 2)
        self.stage_info.append(FeatureInfo("pool5", in_ch, 32))
        self.head = FCHead(in_ch, num_classes, pool_size=7, hidden=4096, drop_rate=drop_rate)
        init_weights(self)

    @property
    def blocks(self) -> list[nn.Sequential]:
        return [self.block1, self.block2, self.block3, self.block4, self.block5]

    def stages(self, x: Tensor):
        x = self.block1(x)
        yield x
        x = self.block2(self.pool(x))
        yield x
        x = self.block3(self.pool(x))
        yield x
        x = self.block4(self.pool(x))
        yield x
        x = self.block5(self.pool(x))
        yield x
        yield self.pool(x)


_VGG = dict(family="VGG", paper="Very Deep Convolutional Networks for Large-Scale Image Recognition (ICLR 2015)",
            year=2014, arxiv="1409.1556", supports_drop_path=False)


@register("vgg11", **_VGG, depth=11)
@register("vgg13", **_VGG, depth=13)
@register("vgg16", **_VGG, depth=16)
@register("vgg19", **_VGG, depth=19)
@register("vgg11_bn", **_VGG, depth=11, batch_norm=True)
@register("vgg13_bn", **_VGG, depth=13, batch_norm=True)
@register("vgg16_bn", **_VGG, depth=16, batch_norm=True)
@register("vgg19_bn", **_VGG, depth=19, batch_norm=True)
def vgg(**kw) -> VGG:
    return VGG(**kw)
