"""Building blocks shared by several families."""

from .conv_bn import ConvBnAct, conv_bn, fold_batchnorm
from .conv_lrn import conv_relu, lrn
from .drop_path import DropPath, drop_path_rates
from .heads import ClassifierHead, ConvClassifierHead, FCHead, ResettableHead
from .inverted_residual import InvertedResidual
from .learned_group_conv import CondensedGroupConv, LearnedGroupConv
from .misc import make_divisible
from .preact import PreActBasic, PreActBottleneck
from .se import SqueezeExcite
from .shuffle import channel_shuffle

__all__ = [
    "CondensedGroupConv",
    "InvertedResidual",
    "LearnedGroupConv",
    "channel_shuffle",
    "ClassifierHead",
    "ConvClassifierHead",
    "FCHead",
    "ResettableHead",
    "ConvBnAct",
    "PreActBasic",
    "PreActBottleneck",
    "SqueezeExcite",
    "DropPath",
    "conv_bn",
    "conv_relu",
    "drop_path_rates",
    "fold_batchnorm",
    "lrn",
    "make_divisible",
]
