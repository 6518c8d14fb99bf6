"""LeNet-5: LeCun, Bottou, Bengio & Haffner, "Gradient-Based Learning Applied to Document
Recognition" (Proceedings of the IEEE 86(11), 1998; no arXiv id), Section II-B and Fig. 2.

The 1998 network, not the ReLU/max-pool/softmax "LeNet" of tutorials:

- input 32x32 grey (MNIST's 28x28 digits padded), every convolution valid (no padding);
- C1: 6 maps, 5x5 -> 28x28 (156 parameters);
- S2: 2x2 subsampling -> 14x14: the sum of each 2x2 window times a trainable coefficient plus a
  trainable bias, one pair per map (12 parameters), then the squashing function; it is not
  max-pooling;
- C3: 16 maps, 5x5 -> 10x10 on the sparse connection table of Table I: maps 0-5 see three
  contiguous S2 maps, 6-11 four contiguous ones, 12-14 four non-contiguous ones and map 15 all
  six. Only the connected 5x5 kernels are parameters (60 kernels + 16 biases = 1,516), scattered
  into a dense kernel at run time;
- S4: as S2 on 16 maps -> 5x5 (32 parameters);
- C5: 120 maps, 5x5 -> 1x1 (48,120 parameters);
- F6: 84 units (10,164 parameters);
- output: 10 Euclidean RBF units, y_i = sum_j (x_j - w_ij)^2, whose centres are fixed +1/-1
  codes (Sec. II-B: 7x12 bitmaps of the characters, chosen by hand and not trained).

Every layer up to F6 squashes with the paper's scaled tanh f(a) = 1.7159 tanh(2a/3)
(Appendix A), and weights and biases start uniform in +-2.4/F_i, F_i the unit's fan-in
(Appendix A). Trainable parameters: 156 + 12 + 1,516 + 32 + 48,120 + 10,164 = 60,000.

Output: the network returns **negative** RBF distances, -y_i, so that the largest value is the
predicted class (argmax) and the tensor can be used as logits. The paper trains with its own
energy-based criterion (Eq. 9, the RBF output of the correct class plus a log-sum-exp penalty
over the others), which cross-entropy on -y_i closely resembles.

RBF centres: the paper's 7x12 bitmaps are only shown as a picture (Fig. 3), so the digit codes
here are 7-wide x 12-high bitmaps of the digits 0-9 drawn by hand for this file after that
figure's style (+1 ink, -1 background); they are not a pixel copy of Fig. 3. With fewer than 10
classes the first ``num_classes`` digits are used; with more, the classes past 9 get pseudo-random
+1/-1 codes from a fixed seed (the paper used bitmaps of the ASCII set). They are a buffer, not
parameters.

Deviation: inputs larger than 32x32 give C5 maps larger than 1x1; an adaptive average pool to
1x1 before F6 (part of the head) makes any size >= 32 work. At 32x32 it is the identity.

Features: C1 (6 maps, stride 1), C3 (16, stride 2), C5 (120, stride 4), each after its
squashing; the subsampling layers S2/S4 begin the next stage. The valid 5x5 convolutions make
the maps much smaller than input/stride at 32x32 (28, 10, 1), but the strides are exact: each
32 more input pixels add 32/stride feature pixels. LeNet-5 is a digit classifier, **not a
detection backbone**: it is here for the survey's lineage and for small-input experiments.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo
from ..layers.heads import ResettableHead
from ..registry import register

__all__ = ["LeNet5", "C3_TABLE", "digit_codes"]

#: Table I: the S2 maps each C3 map takes as input
C3_TABLE: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)

# 7x12 bitmaps of the digits ('#' = +1, '.' = -1), drawn by hand for this file (see the docstring)
_DIGITS = (
    ("..###..", ".#...#.", "#.....#", "#.....#", "#.....#", "#.....#",
     "#.....#", "#.....#", "#.....#", "#.....#", ".#...#.", "..###.."),
    ("...#...", "..##...", ".#.#...", "...#...", "...#...", "...#...",
     "...#...", "...#...", "...#...", "...#...", "...#...", ".#####."),
    ("..###..", ".#...#.", "#.....#", "......#", ".....#.", "....#..",
     "...#...", "..#....", ".#.....", "#......", "#......", "#######"),
    (".#####.", "#.....#", "......#", "......#", ".....#.", "..###..",
     ".....#.", "......#", "......#", "......#", "#.....#", ".#####."),
    (".....#.", "....##.", "...#.#.", "..#..#.", ".#...#.", "#....#.",
     "#######", ".....#.", ".....#.", ".....#.", ".....#.", ".....#."),
    ("#######", "#......", "#......", "#......", "#####..", ".....#.",
     "......#", "......#", "......#", "......#", "#....#.", ".####.."),
    ("..####.", ".#.....", "#......", "#......", "#.###..", "##...#.",
     "#.....#", "#.....#", "#.....#", "#.....#", ".#...#.", "..###.."),
    ("#######", "......#", ".....#.", ".....#.", "....#..", "....#..",
     "...#...", "...#...", "..#....", "..#....", "..#....", "..#...."),
    ("..###..", ".#...#.", "#.....#", "#.....#", ".#...#.", "..###..",
     ".#...#.", "#.....#", "#.....#", "#.....#", ".#...#.", "..###.."),
    ("..###..", ".#...#.", "#.....#", "#.....#", "#.....#", ".#...##",
     "..###.#", "......#", "......#", ".....#.", "....#..", ".###..."),
)


def digit_codes(num_classes: int = 10, seed: int = 0) -> list[list[float]]:
    """The fixed RBF centres: one 84-long +1/-1 code per class (digit bitmaps first)."""
    codes = [[1.0 if ch == "#" else -1.0 for row in glyph for ch in row] for glyph in _DIGITS[:num_classes]]
    rng = random.Random(seed)
    codes += [[rng.choice((-1.0, 1.0)) for _ in range(84)] for _ in range(num_classes - len(codes))]
    return codes


class ScaledTanh(nn.Module):
    """f(a) = 1.7159 tanh(2a/3) (Appendix A): f(+-1) = +-1 and the gain at 0 is about 1."""

    def forward(self, x: Tensor) -> Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


class Subsampling(nn.Module):
    """S2/S4: the sum of each non-overlapping 2x2 window times a per-map trainable coefficient,
    plus a per-map trainable bias (the squashing follows as a separate module)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        coef = (4.0 * self.weight).view(1, -1, 1, 1)  # avg_pool * 4 = the window's sum
        return torch.addcmul(self.bias.view(1, -1, 1, 1), F.avg_pool2d(x, 2), coef)


class SparseConv2d(nn.Module):
    """A convolution whose output map ``o`` sees only the input maps ``table[o]``.

    Only the connected kernels are parameters (``weight``: connections x k x k); ``forward``
    scatters them into a dense kernel with zeros elsewhere and runs one ``conv2d``.
    """

    def __init__(self, in_ch: int, table: tuple[tuple[int, ...], ...], kernel_size: int = 5) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.k = in_ch, len(table), kernel_size
        flat = [o * in_ch + i for o, inputs in enumerate(table) for i in inputs]
        self.weight = nn.Parameter(torch.empty(len(flat), kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(self.out_ch))
        self.register_buffer("index", torch.tensor(flat, dtype=torch.long), persistent=False)
        self.fan_in = [len(inputs) * kernel_size * kernel_size for inputs in table]

    def dense_weight(self) -> Tensor:
        w = self.weight.new_zeros(self.out_ch * self.in_ch, self.k, self.k).index_copy(0, self.index, self.weight)
        return w.view(self.out_ch, self.in_ch, self.k, self.k)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias)


class EuclideanRBF(nn.Module):
    """Output units y_i = ||x - w_i||^2 on fixed centres; returns -y (larger = more likely)."""

    def __init__(self, centres: Tensor) -> None:
        super().__init__()
        self.register_buffer("centres", centres)

    def forward(self, x: Tensor) -> Tensor:
        return -(x.unsqueeze(1) - self.centres).square().sum(-1)


class LeNetHead(ResettableHead):
    """Adaptive average pool to 1x1 (identity at 32x32) -> F6 (84, scaled tanh) -> RBF output (the classifier:
    ``rbf``, fixed centres, one code per class)."""

    classifier_name = "rbf"

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.num_features = 84
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.f6 = nn.Linear(in_ch, 84)
        self.act = ScaledTanh()
        self.rbf = EuclideanRBF(torch.tensor(digit_codes(num_classes))) if num_classes > 0 else nn.Identity()

    def make_classifier(self, num_classes: int) -> nn.Module:
        return EuclideanRBF(torch.tensor(digit_codes(num_classes))) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.act(self.f6(self.pool(x).flatten(1)))
        return x if pre_logits else self.rbf(x)


class LeNet5(Backbone):
    """LeNet-5 (Fig. 2). Features: ``c1`` (6, s1), ``c3`` (16, s2), ``c5`` (120, s4)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__(in_chans, num_classes)
        self.c1 = nn.Conv2d(in_chans, 6, 5)
        self.s2 = Subsampling(6)
        self.c3 = SparseConv2d(6, C3_TABLE, 5)
        self.s4 = Subsampling(16)
        self.c5 = nn.Conv2d(16, 120, 5)
        self.act = ScaledTanh()
        self.stage_info = [FeatureInfo("c1", 6, 1), FeatureInfo("c3", 16, 2), FeatureInfo("c5", 120, 4)]
        self.head = LeNetHead(120, num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Appendix A: weights (and biases) uniform in +-2.4 / fan-in of their unit."""

        def uniform_(t: Tensor, fan_in: int) -> None:
            t.uniform_(-2.4 / fan_in, 2.4 / fan_in)

        for conv in (self.c1, self.c5):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            uniform_(conv.weight, fan_in)
            uniform_(conv.bias, fan_in)
        for sub in (self.s2, self.s4):  # a subsampling unit has 4 inputs
            uniform_(sub.weight, 4)
            uniform_(sub.bias, 4)
        for o, fan_in in enumerate(self.c3.fan_in):
            uniform_(self.c3.bias[o : o + 1], fan_in)
        starts = [0]
        for inputs in C3_TABLE:
            starts.append(starts[-1] + len(inputs))
        for o, fan_in in enumerate(self.c3.fan_in):
            uniform_(self.c3.weight[starts[o] : starts[o + 1]], fan_in)
        if self.head is not None:
            uniform_(self.head.f6.weight, self.head.f6.in_features)
            uniform_(self.head.f6.bias, self.head.f6.in_features)

    def stages(self, x: Tensor):
        x = self.act(self.c1(x))
        yield x
        x = self.act(self.c3(self.act(self.s2(x))))
        yield x
        yield self.act(self.c5(self.act(self.s4(x))))


@register("lenet5", family="LeNet", paper="Gradient-Based Learning Applied to Document Recognition (Proc. IEEE 86(11))",
          year=1998, dataset="mnist", supports_drop_path=False)
def lenet5(**kw) -> LeNet5:
    return LeNet5(**kw)
