"""Building blocks shared by several families."""

from .conv_bn import ConvBnAct, conv_bn, fold_batchnorm
from .drop_path import DropPath, drop_path_rates
from .heads import ClassifierHead
from .misc import make_divisible
from .preact import PreActBasic, PreActBottleneck
from .se import SqueezeExcite

__all__ = [
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
