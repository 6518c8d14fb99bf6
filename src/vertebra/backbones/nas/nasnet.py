"""NASNet-A: Zoph, Vasudevan, Shlens & Le, "Learning Transferable Architectures for Scalable
Image Recognition" (CVPR 2018, arXiv 1707.07012).

The cell was searched on CIFAR-10 with a reinforcement-learning controller (genotype
``NASNET_A``: Fig. 4 of the paper, as released in TF-slim's ``nasnet_utils.py``) and stacked for
ImageNet as in Fig. 2: a 3x3/2 VALID convolution (32 filters for the mobile model, 96 for the
large: ``stem_multiplier`` 1 and 3), two reduction cells as a stem (widths F/4 and F/2), then
N normal cells at width F, a reduction cell and N normal cells at 2F, a reduction cell and N
normal cells at 4F. "N @ P" names a model by N and the width P = 24F of its penultimate layer:
NASNet-A Mobile is 4 @ 1056 (F = 44, 224 px), NASNet-A Large 6 @ 4032 (F = 168, 331 px).

As in the TF release, the large model's first normal cell after a reduction reads the output
of the cell before the one the reduction cell read as its h_{k-2} (``skip_reduction_layer_input``);
the mobile model reads the cell just before the reduction. Dropout 0.5 before the classifier,
the auxiliary head after the last stride-16 cell and ScheduledDropPath as in the paper's ImageNet
training (``drop_path_rate``: the paper's large model keeps 0.7, i.e. rate 0.3).

``nasnet_a_large`` pads its stride-2 operations as TF 'SAME' does (``tf_same=True``) so that it
computes exactly what timm's ``nasnetalarge`` (the TF checkpoint's port) computes; the mobile
model pads symmetrically (same shapes; ``tf_same=True`` switches it too).
"""

from __future__ import annotations

from ...registry import register
from .cells import CellNet, CellPlan
from .genotypes import NASNET_A, Genotype

_NASNET = dict(family="NASNet", paper="Learning Transferable Architectures for Scalable Image Recognition (CVPR 2018)",
               year=2017, arxiv="1707.07012")


def stacked_plan(genotype: Genotype, n: int, f: int, skip_reduction_input: bool = False) -> list[CellPlan]:
    """NASNet's ImageNet layout (also AmoebaNet's): two stem reduction cells at widths F/4 and
    F/2, then three stacks of ``n`` normal cells at F, 2F, 4F with a reduction cell between
    stacks. Each cell reads the outputs of the two cells before it (state 0 is the stem conv)."""
    red, norm = genotype.reduction, genotype.normal
    plan = [CellPlan(red, int(f * 0.25), True, 0, 0), CellPlan(red, int(f * 0.5), True, 0, 1)]
    for stage in range(3):
        c = f * 2**stage
        if stage:
            s = len(plan) + 1  # index of the state the next cell produces
            plan.append(CellPlan(red, c, True, s - 2, s - 1))
        for i in range(n):
            s = len(plan) + 1
            prev = s - 3 if (stage and i == 0 and skip_reduction_input) else s - 2
            plan.append(CellPlan(norm, c, False, prev, s - 1))
    return plan


class NASNet(CellNet):
    """NASNet-A N @ 24F."""

    def __init__(self, num_cells: int = 4, filters: int = 44, stem_channels: int = 32,
                 skip_reduction_input: bool = False, genotype: Genotype = NASNET_A, **kw) -> None:
        super().__init__(stacked_plan(genotype, num_cells, filters, skip_reduction_input), stem_channels, **kw)


@register("nasnet_a_mobile", **_NASNET, num_cells=4, filters=44, stem_channels=32, skip_reduction_input=False,
          tf_same=False, aux_grid=4)
@register("nasnet_a_large", **_NASNET, num_cells=6, filters=168, stem_channels=96, skip_reduction_input=True,
          tf_same=True, aux_grid=6)
def nasnet(*, drop_rate: float = 0.5, **kw) -> NASNet:
    return NASNet(drop_rate=drop_rate, **kw)
