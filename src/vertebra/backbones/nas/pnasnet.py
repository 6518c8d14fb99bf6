"""PNASNet-5: Liu, Zoph, Neumann, Shlens, Hua, Li, Fei-Fei, Yuille, Huang & Murphy,
"Progressive Neural Architecture Search" (ECCV 2018, arXiv 1712.00559).

One cell of five blocks (genotype ``PNASNET_5``: Fig. 1 of the paper, as released in
TF-slim's ``pnasnet.py``), found by sequential model-based search; there is no separate
reduction cell: the same cell reduces with stride 2 (its identity branch becoming a strided
1x1 conv). ImageNet layout (Fig. 1 / the TF release): a 3x3/2 VALID stem convolution (32
filters mobile, 96 large), two stem cells with stride 2 at widths F/4 and F/2, then three
stacks of N cells at F, 2F, 4F where the first cell of the second and third stack is the
strided one. Every cell outputs all five blocks (5F wide). PNASNet-5 Mobile: N=3, F=54 at
224 px; PNASNet-5 Large: N=4, F=216 at 331 px. Auxiliary head after the last stride-16 cell and
dropout 0.5 as in the release's training configuration.

``pnasnet5_large`` pads its stride-2 operations as TF 'SAME' does (``tf_same=True``) so that it
computes exactly what timm's ``pnasnet5large`` (the TF checkpoint's port) computes; the mobile
model pads symmetrically.
"""

from __future__ import annotations

from ...registry import register
from .cells import CellNet, CellPlan
from .genotypes import PNASNET_5, Genotype

_PNAS = dict(family="PNASNet", paper="Progressive Neural Architecture Search (ECCV 2018)", year=2017,
             arxiv="1712.00559")


def pnas_plan(genotype: Genotype, n: int, f: int) -> list[CellPlan]:
    """Two strided stem cells (F/4, F/2), then 3 stacks of ``n`` cells at F, 2F, 4F whose first
    cell in stacks 2 and 3 reduces. Each cell reads the outputs of the two cells before it."""
    cell = genotype.reduction
    plan = [CellPlan(cell, int(f * 0.25), True, 0, 0), CellPlan(cell, int(f * 0.5), True, 0, 1)]
    for stage in range(3):
        for i in range(n):
            s = len(plan) + 1
            red = bool(stage and i == 0)
            plan.append(CellPlan(genotype.reduction if red else genotype.normal, f * 2**stage, red, s - 2, s - 1))
    return plan


class PNASNet(CellNet):
    """PNASNet-5 (N, F)."""

    def __init__(self, num_cells: int = 3, filters: int = 54, stem_channels: int = 32,
                 genotype: Genotype = PNASNET_5, **kw) -> None:
        super().__init__(pnas_plan(genotype, num_cells, filters), stem_channels, **kw)


@register("pnasnet5_mobile", **_PNAS, num_cells=3, filters=54, stem_channels=32, tf_same=False, aux_grid=4)
@register("pnasnet5_large", **_PNAS, num_cells=4, filters=216, stem_channels=96, tf_same=True, aux_grid=6)
def pnasnet(*, drop_rate: float = 0.5, **kw) -> PNASNet:
    return PNASNet(drop_rate=drop_rate, **kw)
