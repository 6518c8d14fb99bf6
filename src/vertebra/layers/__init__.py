"""Building blocks shared by several families."""

from .conv_bn import ConvBnAct, conv_bn, fold_batchnorm
from .drop_path import DropPath, drop_path_rates
from .heads import ClassifierHead
from .inverted_residual import InvertedResidual
from .learned_group_conv import CondensedGroupConv, LearnedGroupConv
from .misc import make_divisible
from .preact import PreActBasic, PreActBottleneck
from .se import SqueezeExcite
from .shuffle import ChannelShuffle, channel_shuffle

__all__ = [
    "ChannelShuffle",
    "CondensedGroupConv",
    "InvertedResidual",
    "LearnedGroupConv",
    "channel_shuffle",
    "ClassifierHead",
    "ConvBnAct",
    "PreActBasic",
    "PreActBottleneck",
    "SqueezeExcite",
    "DropPath",
    "conv_bn",
    "drop_path_rates",
    "fold_batchnorm",
    "make_divisible",
]
