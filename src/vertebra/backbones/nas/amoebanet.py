"""AmoebaNet-A: Real, Aggarwal, Huang & Le, "Regularized Evolution for Image Classifier
Architecture Search" (AAAI 2019, arXiv 1802.01548).

The cells were found by regularized (aging) evolution in the NASNet search space (genotype
``AMOEBANET_A``: Fig. 4 of the paper as the authors released it in tensorflow/tpu
``amoeba_net``) and are stacked for ImageNet as NASNet's (the paper's Fig. 3): a 3x3/2 VALID
stem convolution, two stem reduction cells (widths int(F/4), int(F/2)), three stacks of N
normal cells at F, 2F, 4F with a reduction cell between stacks, each cell reading the outputs
of the two cells before it. A normal cell is 4F wide, a reduction cell 5F. The paper's ImageNet
models (Table 3): mobile N=4, F=50 at 224 px (5.1M parameters, 555M mult-adds) and large N=6,
F=190 at 331 px (86.7M, 23.1B). The 1x7-then-7x1 convolution of the reduction cell is the
release's: inside a 1x1 bottleneck to F/4 (a plain 1x7-7x1 makes the large model 96.0M, 11%
over the paper's count; the bottleneck gives 86.74M).

Not in the paper and not fixed by the release's code (its stem width is an hparam): the stem
convolution is 32 wide (mobile) and 96 (large), as NASNet's. The auxiliary head after the last
stride-16 cell (weight 0.4 in the release's loss), dropout 0.5 and scheduled drop-path follow
the release. There are no published PyTorch weights of AmoebaNet-A (timm has none; the
tensorflow/tpu checkpoints are AmoebaNet-D, another cell).
"""

from __future__ import annotations

from ...registry import register
from .cells import CellNet
from .genotypes import AMOEBANET_A, Genotype
from .nasnet import stacked_plan

_AMOEBA = dict(family="AmoebaNet", paper="Regularized Evolution for Image Classifier Architecture Search (AAAI 2019)",
               year=2018, arxiv="1802.01548")


class AmoebaNet(CellNet):
    """AmoebaNet-A (N, F)."""

    def __init__(self, num_cells: int = 4, filters: int = 50, stem_channels: int = 32,
                 genotype: Genotype = AMOEBANET_A, **kw) -> None:
        super().__init__(stacked_plan(genotype, num_cells, filters), stem_channels, **kw)


@register("amoebanet_a_mobile", **_AMOEBA, num_cells=4, filters=50, stem_channels=32, aux_grid=4)
@register("amoebanet_a_large", **_AMOEBA, num_cells=6, filters=190, stem_channels=96, aux_grid=6)
def amoebanet(*, drop_rate: float = 0.5, **kw) -> AmoebaNet:
    return AmoebaNet(drop_rate=drop_rate, **kw)
