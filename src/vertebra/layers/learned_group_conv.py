"""Learned group convolution (Huang, Liu, van der Maaten, Weinberger, "CondenseNet: An Efficient
DenseNet using Learned Group Convolutions", CVPR 2018, arXiv 1711.09224, Sec. 3.1 and 4.1).

Training time (:class:`LearnedGroupConv`): BN -> ReLU -> (dropout) -> a full 1x1 convolution whose
output filters are split into G groups (filter ``k*G + g`` belongs to group g) and whose input
connections are masked per group. Condensation happens during training: the first half of the
run is split into C-1 "condensing stages"; entering stage s (at progress s / (2(C-1))) each group
drops the 1/C of its remaining inputs with the smallest summed weight magnitude (L1 norm over the
group's filters), so after the last stage each group keeps 1/C of the inputs; the second half
("optimisation stage") trains the pruned network. A group-lasso penalty (``lasso_loss``,
sum over groups and inputs of the L2 norm of the group's weights on that input) pushes whole
input columns of a group towards zero before they are pruned.

Test time (:class:`CondensedGroupConv`): the kept inputs are gathered by an index layer (a fixed
channel selection, duplicates allowed), normalised with their own BN statistics, convolved by an
ordinary grouped 1x1 convolution, and the output is permuted back to the training layout (a
channel shuffle with G groups, the paper's "permute"). :meth:`CondensedGroupConv.from_learned`
builds it from a trained layer; its output equals the masked layer's in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .shuffle import channel_shuffle


def condensation_stage(progress: float, condense_factor: int) -> int:
    """The paper's schedule: stage s in 0..C-1 at training progress ``progress`` (0..1);
    stage s starts at progress s / (2 (C-1)), the last (C-1) at one half."""
    if condense_factor <= 1:
        return 0
    return min(condense_factor - 1, int(2 * float(progress) * (condense_factor - 1) + 1e-9))


class LearnedGroupConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, condense_factor: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        if out_ch % groups:
            raise ValueError(f"learned group conv: {out_ch} filters do not split into {groups} groups")
        if in_ch < condense_factor:
            raise ValueError(f"learned group conv: {in_ch} inputs cannot be condensed by {condense_factor}")
        self.in_ch, self.out_ch = in_ch, out_ch
        self.groups, self.condense_factor = groups, condense_factor
        self.norm = nn.BatchNorm2d(in_ch)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        # mask[g, j]: does group g still see input j; stage: condensing stages applied so far
        self.register_buffer("mask", torch.ones(groups, in_ch))
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))

    @property
    def kept_per_group(self) -> int:
        s = int(self.stage)
        return self.in_ch - s * (self.in_ch // self.condense_factor)

    def weight_mask(self) -> Tensor:
        """The (out, in) mask: filter k*G + g takes group g's row."""
        return self.mask.repeat(self.out_ch // self.groups, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.norm(x)))
        w = self.conv.weight * self.weight_mask()[:, :, None, None]
        return F.conv2d(x, w)

    def _group_view(self, w: Tensor) -> Tensor:
        """(out, in) -> (G, out/G, in): group g's filters are k*G + g."""
        return w.reshape(self.out_ch // self.groups, self.groups, self.in_ch).transpose(0, 1)

    @torch.no_grad()
    def condense_to(self, stage: int) -> None:
        """Apply the condensing stages up to ``stage`` (each drops in // C inputs per group)."""
        stage = min(int(stage), self.condense_factor - 1)
        delta = self.in_ch // self.condense_factor
        while int(self.stage) < stage:
            w = self._group_view(self.conv.weight.abs().flatten(1) * self.weight_mask())
            importance = w.sum(1)  # (G, in): L1 norm of each input's weights in the group
            importance = importance.masked_fill(self.mask == 0, float("inf"))
            drop = importance.topk(delta, dim=1, largest=False).indices
            self.mask.scatter_(1, drop, 0.0)
            self.stage += 1

    def lasso_loss(self) -> Tensor:
        """Group lasso: sum over groups g and inputs j of ||W[group g, j]||_2 (zero once fully condensed)."""
        if int(self.stage) >= self.condense_factor - 1:
            return self.conv.weight.new_zeros(())
        w = self._group_view((self.conv.weight.flatten(1) * self.weight_mask()).square())
        return w.sum(1).clamp_min(1e-6).sqrt().sum()


class CondensedGroupConv(nn.Module):
    """index -> BN -> ReLU -> 1x1 group conv -> permute (channel shuffle with G groups)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, kept_per_group: int) -> None:
        super().__init__()
        self.groups = groups
        n = groups * kept_per_group
        # a fresh condensed layer (no trained parent) reads the inputs in order, cyclically
        self.register_buffer("index", torch.arange(n) % in_ch)
        self.norm = nn.BatchNorm2d(n)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(n, out_ch, 1, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(self.act(self.norm(x.index_select(1, self.index))))
        return channel_shuffle(x, self.groups)

    @classmethod
    @torch.no_grad()
    def from_learned(cls, lgc: LearnedGroupConv) -> CondensedGroupConv:
        kept = lgc.mask.sum(1)
        if not bool((kept == kept[0]).all()):
            raise ValueError("the groups of this learned group conv keep different numbers of inputs")
        m, g, d_out = int(kept[0]), lgc.groups, lgc.out_ch // lgc.groups
        new = cls(lgc.in_ch, lgc.out_ch, g, m).to(lgc.conv.weight.device, lgc.conv.weight.dtype)
        index = torch.stack([lgc.mask[i].nonzero().flatten() for i in range(g)])  # (G, m), ascending
        new.index.copy_(index.flatten())
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new.norm, name).copy_(getattr(lgc.norm, name)[new.index])
        new.norm.num_batches_tracked.copy_(lgc.norm.num_batches_tracked)
        new.norm.eps, new.norm.momentum = lgc.norm.eps, lgc.norm.momentum
        w = lgc._group_view(lgc.conv.weight.flatten(1))  # (G, d_out, in)
        w = torch.gather(w, 2, index[:, None, :].expand(g, d_out, m))  # (G, d_out, m)
        new.conv.weight.copy_(w.reshape(g * d_out, m, 1, 1))
        return new
