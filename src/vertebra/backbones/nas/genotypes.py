"""Searched cells written as data.

A cell has two inputs and B blocks. Hidden state 0 is the output of the cell two back
(h_{k-2}), hidden state 1 the output of the previous cell (h_{k-1}), and block j adds hidden
state 2 + j. Each block reads two hidden states, applies one operation to each and sums the
results; the cell's output concatenates the hidden states listed in ``concat``. This is the
convention of DARTS' ``genotypes.py``; the TensorFlow releases of NASNet and PNASNet number
their two inputs the other way round (0 = the previous cell), which is flipped here.

Within a block the two operations are listed in the order of the TensorFlow releases' tables
(the ports name them ``comb_iter_j_left`` and ``_right``).

Operation names (all applied ReLU -> conv -> BN in the TensorFlow way):

``sep_3x3 sep_5x5 sep_7x7``  separable convolution applied twice (depthwise + pointwise, BN,
                             ReLU, depthwise + pointwise, BN), as in NASNet/PNASNet/AmoebaNet
``dil_3x3``                  3x3 convolution with dilation 2 (in a 1x1 bottleneck, see ``cells``)
``conv_1x1 conv_3x3``        plain convolutions (the 3x3 in a 1x1 bottleneck)
``conv_1x3_3x1 conv_1x7_7x1`` factorised convolutions, 1xk then kx1 (in a 1x1 bottleneck)
``avg_3x3 max_3x3 max_5x5 max_7x7`` poolings (followed by a 1x1 conv + BN where the input's
                             width differs from the cell's)
``identity``                 the input itself (ReLU -> 1x1 conv (stride) -> BN where it must
                             change stride or width)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OPS", "CellGenotype", "Genotype", "NASNET_A", "AMOEBANET_A", "PNASNET_5"]

OPS = (
    "identity",
    "sep_3x3",
    "sep_5x5",
    "sep_7x7",
    "dil_3x3",
    "conv_1x1",
    "conv_3x3",
    "conv_1x3_3x1",
    "conv_1x7_7x1",
    "avg_3x3",
    "max_3x3",
    "max_5x5",
    "max_7x7",
)

Edge = tuple[str, int]  # (operation, hidden state it reads)


@dataclass(frozen=True)
class CellGenotype:
    """``blocks``: one ``((op_a, input_a), (op_b, input_b))`` per block; ``concat``: the hidden
    states the cell outputs, concatenated along channels."""

    blocks: tuple[tuple[Edge, Edge], ...]
    concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for j, block in enumerate(self.blocks):
            if len(block) != 2:
                raise ValueError(f"block {j} has {len(block)} operations; a block combines exactly two")
            for op, idx in block:
                if op not in OPS:
                    raise ValueError(f"block {j}: unknown operation {op!r}; known: {', '.join(OPS)}")
                if not 0 <= idx < 2 + j:
                    raise ValueError(f"block {j} reads hidden state {idx}; only 0..{1 + j} exist before it")
        n = 2 + len(self.blocks)
        if not self.concat or any(not 0 <= i < n for i in self.concat):
            raise ValueError(f"concat {self.concat} must name hidden states in 0..{n - 1}")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def inputs_of(self, j: int) -> tuple[int, int]:
        """The hidden states block ``j`` reads."""
        (_, a), (_, b) = self.blocks[j]
        return a, b


@dataclass(frozen=True)
class Genotype:
    """A searched architecture: its normal cell and its reduction cell. ``reduce=None`` means
    the normal cell reduces with stride 2 (PNASNet has one cell type)."""

    name: str
    normal: CellGenotype
    reduce: CellGenotype | None = None

    @property
    def reduction(self) -> CellGenotype:
        return self.normal if self.reduce is None else self.reduce


# NASNet-A (Zoph et al. 2018, Fig. 4; TF-slim nasnet_utils.py). Normal cell: five blocks, output
# the five blocks and h_{k-2} (the TF release concatenates every hidden state no block uses, and
# the previous cell's output h_{k-1} is used). Reduction cell: output blocks 1-4.
NASNET_A = Genotype(
    name="NASNet-A",
    normal=CellGenotype(
        blocks=(
            (("sep_5x5", 1), ("sep_3x3", 0)),
            (("sep_5x5", 0), ("sep_3x3", 0)),
            (("avg_3x3", 1), ("identity", 0)),
            (("avg_3x3", 0), ("avg_3x3", 0)),
            (("sep_3x3", 1), ("identity", 1)),
        ),
        concat=(0, 2, 3, 4, 5, 6),
    ),
    reduce=CellGenotype(
        blocks=(
            (("sep_5x5", 1), ("sep_7x7", 0)),
            (("max_3x3", 1), ("sep_7x7", 0)),
            (("avg_3x3", 1), ("sep_5x5", 0)),
            (("identity", 3), ("avg_3x3", 2)),
            (("sep_3x3", 2), ("max_3x3", 1)),
        ),
        concat=(3, 4, 5, 6),
    ),
)

# AmoebaNet-A (Real et al. 2019, Fig. 4), as the authors released it (tensorflow/tpu amoeba_net
# ``model_specs.py``, 'amoeba_net_a'; there the inputs are numbered the other way round). The
# release's cells output the hidden states its "used" lists leave out: h_{k-2} and blocks 1, 2, 4
# of the normal cell (4F wide), all five blocks of the reduction cell (5F). With the release's
# bottlenecked 1x7-7x1 convolution this gives the paper's Table 3 figures (5.09M / 0.555 G
# mult-adds mobile, 86.7M large, 468M for F=448). DARTS' genotypes.py transcribes the figure
# with other inputs and outputs (4.99M and 84.4M with a plain 1x7-7x1).
AMOEBANET_A = Genotype(
    name="AmoebaNet-A",
    normal=CellGenotype(
        blocks=(
            (("avg_3x3", 1), ("max_3x3", 1)),
            (("sep_3x3", 0), ("identity", 0)),
            (("identity", 1), ("avg_3x3", 0)),
            (("sep_3x3", 1), ("sep_5x5", 2)),
            (("avg_3x3", 5), ("sep_3x3", 1)),
        ),
        concat=(0, 3, 4, 6),
    ),
    reduce=CellGenotype(
        blocks=(
            (("sep_3x3", 0), ("avg_3x3", 1)),
            (("max_3x3", 1), ("sep_7x7", 2)),
            (("max_3x3", 0), ("max_3x3", 1)),
            (("sep_3x3", 4), ("conv_1x7_7x1", 1)),
            (("avg_3x3", 0), ("sep_7x7", 1)),
        ),
        concat=(2, 3, 4, 5, 6),
    ),
)

# PNASNet-5 (Liu et al. 2018, Fig. 1; TF-slim pnasnet.py). One cell; it reduces with stride 2
# where the network reduces. Output: all five blocks.
PNASNET_5 = Genotype(
    name="PNASNet-5",
    normal=CellGenotype(
        blocks=(
            (("sep_5x5", 0), ("max_3x3", 0)),
            (("sep_7x7", 1), ("max_3x3", 1)),
            (("sep_5x5", 1), ("sep_3x3", 1)),
            (("sep_3x3", 4), ("max_3x3", 1)),
            (("sep_3x3", 0), ("identity", 1)),
        ),
        concat=(2, 3, 4, 5, 6),
    ),
)
