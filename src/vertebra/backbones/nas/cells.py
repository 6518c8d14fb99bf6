"""The cell machinery shared by NASNet-A, AmoebaNet-A and PNASNet-5.

- The operations of their search spaces, each in the TensorFlow releases' ReLU -> conv -> BN
  order (BatchNorm eps 1e-3 as there): the separable convolution applied twice, the plain,
  dilated and factorised (1xk then kx1) convolutions (inside a 1x1 bottleneck, as the AmoebaNet
  release builds them: the one release that implements them), average and max poolings, identity.
  Stride handling: an operation that reads one of the cell's two inputs takes the cell's
  stride, one that reads a block output runs at stride 1. A pooling whose input is wider
  than the cell adds a 1x1 conv + BN, an identity that must change stride or width becomes
  ReLU -> 1x1 conv (stride) -> BN (both as in TF-slim's ``nasnet_utils``).
- Padding: stride-1 operations pad symmetrically (TF 'SAME' is symmetric for odd kernels at
  stride 1). Stride-2 operations pad symmetrically too (``k // 2``: same output size as 'SAME'),
  or, with ``tf_same=True``, exactly as TF 'SAME' does (asymmetric: the extra row and column go
  bottom/right, computed from the input size): that is what the TF checkpoints, and the timm
  ports of them, compute. As in timm, a stride-2 average pooling under ``tf_same`` averages over
  the zero padding (TF excludes it); the stride-1 ones exclude it.
- The factorised reduction: where a cell's earlier input h_{k-2} has twice the resolution of
  h_{k-1}, it is ReLU'd and halved by two 1x1 convolutions on stride-2 subsamplings shifted by
  one pixel against each other, concatenated, then BN.
- :class:`Cell`: a normal or reduction cell built from a :class:`~.genotypes.CellGenotype`.
- :class:`ScheduledDropPath`: NASNet's ScheduledDropPath. Cell k of K (stem cells counted)
  drops each non-identity operation's output per sample with rate ``drop_path_rate * k / K``,
  times the training progress set by :meth:`CellNet.set_drop_path_progress` (the paper ramps
  it linearly from 0 over training; the default, 1, applies the full rate).
- :class:`CellNet`: the ImageNet network of all three papers: a 3x3/2 VALID stem convolution,
  two stem reduction cells, then cells laid out by a plan that each paper's module writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbone import Backbone, FeatureInfo, init_weights
from ...layers import ClassifierHead, ConvBnAct, DropPath, drop_path_rates
from ...layers.heads import ResettableHead
from .genotypes import CellGenotype

__all__ = ["SamePad", "SepConv", "BottleneckConv", "FactorizedReduce", "make_op", "Cell", "ScheduledDropPath",
           "AuxHead", "CellPlan", "CellNet"]

BN_EPS = 1e-3


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class SamePad(nn.Module):
    """TF 'SAME' padding for a strided op: pads (total // 2, total - total // 2) per dimension."""

    def __init__(self, kernel_size, stride, dilation=1, value: float = 0.0) -> None:
        super().__init__()
        self.k, self.s, self.d = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.k, self.s, self.d):
            total = max(((size + s - 1) // s - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return F.pad(x, (left, right, top, bottom), value=self.value)

    def extra_repr(self) -> str:
        return f"kernel={self.k}, stride={self.s}"


def _padding(kernel_size, stride, dilation, tf_same: bool, value: float = 0.0):
    """(static padding, optional SamePad module) for an op."""
    k, s, d = _pair(kernel_size), _pair(stride), _pair(dilation)
    if tf_same and s != (1, 1):
        return (0, 0), SamePad(k, s, d, value)
    return tuple(dd * (kk - 1) // 2 for kk, dd in zip(k, d)), None


def relu_conv_bn(c_in: int, c_out: int, kernel_size=1, stride=1, dilation: int = 1, tf_same: bool = False,
                 inplace: bool = False) -> nn.Sequential:
    """ReLU -> conv -> BN (children ``act``, [``pad``], ``conv``, ``bn``)."""
    pad, pad_mod = _padding(kernel_size, stride, dilation, tf_same)
    m = nn.Sequential()
    m.add_module("act", nn.ReLU(inplace=inplace))
    if pad_mod is not None:
        m.add_module("pad", pad_mod)
    m.add_module("conv", nn.Conv2d(c_in, c_out, kernel_size, stride, pad, dilation, bias=False))
    m.add_module("bn", nn.BatchNorm2d(c_out, eps=BN_EPS))
    return m


class SepConv(nn.Sequential):
    """The separable convolution applied twice: ReLU, depthwise kxk (stride), pointwise to
    ``c_out``, BN, ReLU, depthwise kxk, pointwise, BN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, tf_same: bool = False) -> None:
        super().__init__()
        pad, pad_mod = _padding(kernel_size, stride, 1, tf_same)
        p1 = kernel_size // 2
        self.add_module("act1", nn.ReLU(inplace=False))
        if pad_mod is not None:
            self.add_module("pad1", pad_mod)
        self.add_module("dw1", nn.Conv2d(c_in, c_in, kernel_size, stride, pad, groups=c_in, bias=False))
        self.add_module("pw1", nn.Conv2d(c_in, c_out, 1, bias=False))
        self.add_module("bn1", nn.BatchNorm2d(c_out, eps=BN_EPS))
        self.add_module("act2", nn.ReLU(inplace=True))
        self.add_module("dw2", nn.Conv2d(c_out, c_out, kernel_size, 1, p1, groups=c_out, bias=False))
        self.add_module("pw2", nn.Conv2d(c_out, c_out, 1, bias=False))
        self.add_module("bn2", nn.BatchNorm2d(c_out, eps=BN_EPS))


class BottleneckConv(nn.Sequential):
    """The plain, dilated and factorised convolutions of the search space, in the form the
    AmoebaNet release (tensorflow/tpu ``network_utils``) builds them: ReLU -> 1x1 conv to a
    bottleneck width (``c_out // 4``; ``3 c_out // 8`` for 1x3-3x1) -> BN -> ReLU -> the
    convolution (1xk then kx1 with BN + ReLU between, for the factorised ones; the stride split
    as (1, s) then (s, 1)) -> BN -> ReLU -> 1x1 conv to ``c_out`` -> BN. Where the bottleneck
    would be empty: ReLU -> the convolution -> BN."""

    def __init__(self, name: str, c_in: int, c_out: int, stride: int = 1, tf_same: bool = False) -> None:
        super().__init__()
        r = 3 * c_out // 8 if name == "conv_1x3_3x1" else c_out // 4
        mid = r if r >= 1 else c_out
        self.add_module("act", nn.ReLU(inplace=False))
        if r >= 1:
            self.add_module("pre", nn.Conv2d(c_in, r, 1, bias=False))
            self.add_module("pre_bn", nn.BatchNorm2d(r, eps=BN_EPS))
            self.add_module("pre_act", nn.ReLU(inplace=True))
            c_in = r
        if name.startswith("conv_1x"):
            k = int(name[7])
            convs = [((1, k), (1, stride)), ((k, 1), (stride, 1))]
            dilation = 1
        else:
            convs = [((3, 3), (stride, stride))]
            dilation = 2 if name == "dil_3x3" else 1
        for i, (ks, st) in enumerate(convs, start=1):
            if i > 1:
                self.add_module(f"bn{i - 1}", nn.BatchNorm2d(mid, eps=BN_EPS))
                self.add_module(f"act{i - 1}", nn.ReLU(inplace=True))
            pad, pad_mod = _padding(ks, st, dilation, tf_same)
            if pad_mod is not None:
                self.add_module(f"pad{i}", pad_mod)
            self.add_module(f"conv{i}", nn.Conv2d(c_in if i == 1 else mid, mid, ks, st, pad, dilation, bias=False))
        self.add_module("bn", nn.BatchNorm2d(mid, eps=BN_EPS))
        if r >= 1:
            self.add_module("post_act", nn.ReLU(inplace=True))
            self.add_module("post", nn.Conv2d(r, c_out, 1, bias=False))
            self.add_module("post_bn", nn.BatchNorm2d(c_out, eps=BN_EPS))


def pool_op(kind: str, k: int, c_in: int, c_out: int, stride: int, tf_same: bool) -> nn.Sequential:
    """A pooling (children [``pad``], ``pool``), then 1x1 conv + BN where the width changes."""
    m = nn.Sequential()
    if kind == "max":
        pad, pad_mod = _padding(k, stride, 1, tf_same, value=-math.inf)
        if pad_mod is not None:
            m.add_module("pad", pad_mod)
        m.add_module("pool", nn.MaxPool2d(k, stride, pad))
    else:
        pad, pad_mod = _padding(k, stride, 1, tf_same)
        if pad_mod is not None:
            m.add_module("pad", pad_mod)
        m.add_module("pool", nn.AvgPool2d(k, stride, pad, count_include_pad=False))
    if c_in != c_out:
        m.add_module("conv", nn.Conv2d(c_in, c_out, 1, bias=False))
        m.add_module("bn", nn.BatchNorm2d(c_out, eps=BN_EPS))
    return m


def make_op(name: str, c_in: int, c_out: int, stride: int = 1, tf_same: bool = False) -> nn.Module:
    """The module of one search-space operation (see ``genotypes`` for the names)."""
    if name == "identity":
        if stride == 1 and c_in == c_out:
            return nn.Identity()
        return relu_conv_bn(c_in, c_out, 1, stride)
    kind, _, size = name.partition("_")
    if kind == "sep":
        return SepConv(c_in, c_out, int(size[0]), stride, tf_same)
    if kind in ("avg", "max"):
        return pool_op(kind, int(size[0]), c_in, c_out, stride, tf_same)
    if name == "conv_1x1":
        return relu_conv_bn(c_in, c_out, 1, stride)
    if name in ("conv_3x3", "dil_3x3", "conv_1x3_3x1", "conv_1x7_7x1"):
        return BottleneckConv(name, c_in, c_out, stride, tf_same)
    raise ValueError(f"unknown cell operation {name!r}")


class FactorizedReduce(nn.Module):
    """ReLU, then two 1x1 convolutions of the stride-2 subsampling and of the same subsampling
    shifted by one pixel (right and down), concatenated, then BN: halves the resolution of a
    cell input that is one reduction behind."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv1(x[:, :, ::2, ::2]), self.conv2(shifted[:, :, ::2, ::2])], 1))


class ScheduledDropPath(DropPath):
    """DropPath whose rate is ``p_max`` times the training progress (0..1)."""

    def __init__(self, p_max: float = 0.0) -> None:
        super().__init__(p_max)
        self.p_max = float(p_max)

    def set_progress(self, progress: float) -> None:
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"drop-path progress must be in [0, 1], got {progress}")
        self.p = self.p_max * progress

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}, p_max={self.p_max:.3f}"


class Cell(nn.Module):
    """A cell built from a genotype.

    Inputs ``(s0, s1)`` = (h_{k-2}, h_{k-1}). ``s1`` always goes through ReLU -> 1x1 conv -> BN
    to the cell's width ``c``; ``s0`` too, or through a :class:`FactorizedReduce` where it is one
    reduction behind (``reduce_prev``), or is used raw (``raw_prev``: the first stem cell, whose
    two inputs are both the stem convolution). ``ops[2 j]`` and ``ops[2 j + 1]`` are block j's
    two operations, ``reads[2 j]`` and ``reads[2 j + 1]`` the hidden states they read.
    """

    def __init__(self, genotype: CellGenotype, c_pp: int, c_p: int, c: int, *, reduction: bool = False,
                 reduce_prev: bool = False, raw_prev: bool = False, tf_same: bool = False,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if reduction and any(i < 2 for i in genotype.concat):
            raise ValueError("a reduction cell cannot output one of its (unreduced) inputs")
        self.genotype, self.reduction = genotype, reduction
        if raw_prev:
            self.pre0, c0 = nn.Identity(), c_pp
        elif reduce_prev:
            self.pre0, c0 = FactorizedReduce(c_pp, c), c
        elif c_pp != c:
            self.pre0, c0 = relu_conv_bn(c_pp, c, 1), c
        else:  # TF-slim adjusts h_{k-2} only where its width differs
            self.pre0, c0 = nn.Identity(), c
        self.pre1 = relu_conv_bn(c_p, c, 1)
        widths = [c0, c]
        ops, reads, droppable = [], [], []
        for block in genotype.blocks:
            for name, idx in block:
                stride = 2 if reduction and idx < 2 else 1
                op = make_op(name, widths[idx], c, stride, tf_same)
                ops.append(op)
                reads.append(idx)
                droppable.append(name != "identity")  # TF-slim drops every op's output but identity's
            widths.append(c)
        self.ops = nn.ModuleList(ops)
        self.reads: tuple[int, ...] = tuple(reads)
        self.droppable: tuple[bool, ...] = tuple(droppable)
        self.concat: tuple[int, ...] = tuple(genotype.concat)
        self.out_channels = c * len(self.concat)
        self.drop_path = ScheduledDropPath(drop_path)

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for j in range(len(self.ops) // 2):
            out = None
            for i in (2 * j, 2 * j + 1):
                h = self.ops[i](states[self.reads[i]])
                if self.droppable[i]:
                    h = self.drop_path(h)
                out = h if out is None else out + h
            states.append(out)
        return torch.cat([states[i] for i in self.concat], 1)


class AuxHead(ResettableHead):
    """NASNet's auxiliary classifier (TF-slim ``_build_aux_head``) on the ReLU'd stride-16
    features: average pool, 1x1 conv 128 + BN + ReLU, a conv 768 covering the whole pooled grid
    + BN + ReLU, FC. TF pools 5x5/3 VALID; here an adaptive pool to the grid that gives at the
    paper's input size (``grid``), so any input size works with the same weights."""

    num_features = 768

    def __init__(self, c_in: int, num_classes: int, grid: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = ConvBnAct(c_in, 128, 1, bn_eps=BN_EPS)
        self.conv = ConvBnAct(128, 768, grid, padding=0, bn_eps=BN_EPS)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(self.proj(self.pool(x))).flatten(1))


@dataclass(frozen=True)
class CellPlan:
    """One cell of a network: its genotype, width, whether it reduces, and which earlier
    states it reads (indices into the list [stem conv, cell 0, cell 1, ...])."""

    genotype: CellGenotype
    channels: int
    reduction: bool
    prev: int
    cur: int


class CellNet(Backbone):
    """A cell network on ImageNet: conv 3x3/2 VALID + BN, then the planned cells (the first two
    are the stem reduction cells). Features: the stem convolution (s2) and the ReLU'd output of
    the last cell at each of strides 4, 8, 16, 32 (each cell applies that ReLU to its inputs
    first, so these are the tensors the next cells see).

    ``aux_logits=True`` adds the auxiliary classifier on the stride-16 features
    (``self.aux_heads[0]``); in train mode ``forward`` then returns ``(logits, aux_logits)``.
    """

    def __init__(self, plan: Sequence[CellPlan], stem_channels: int, num_classes: int = 1000,
                 in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0, tf_same: bool = False,
                 aux_logits: bool = False, aux_grid: int = 4) -> None:
        super().__init__(in_chans, num_classes)
        self.conv0 = ConvBnAct(in_chans, stem_channels, 3, 2, padding=0, act=None, bn_eps=BN_EPS)
        widths, strides = [stem_channels], [2]
        rates = drop_path_rates(drop_path_rate, len(plan))
        cells, wiring = [], []
        for k, p in enumerate(plan):
            if not (0 <= p.prev < len(widths) and 0 <= p.cur < len(widths)):
                raise ValueError(f"cell {k} reads state {p.prev} or {p.cur}; only 0..{len(widths) - 1} exist")
            ratio = strides[p.cur] // strides[p.prev]
            if ratio not in (1, 2):
                raise ValueError(f"cell {k}: its inputs are {ratio}x apart in resolution (at most one reduction)")
            cell = Cell(p.genotype, widths[p.prev], widths[p.cur], p.channels, reduction=p.reduction,
                        reduce_prev=ratio == 2, raw_prev=k == 0, tf_same=tf_same, drop_path=rates[k])
            cells.append(cell)
            wiring.append((p.prev, p.cur))
            widths.append(cell.out_channels)
            strides.append(strides[p.cur] * (2 if p.reduction else 1))
        self.cells = nn.ModuleList(cells)
        self.wiring: tuple[tuple[int, int], ...] = tuple(wiring)
        # the cell (1-based, as its state index) after which each state is read no more
        last = [0] * (len(plan) + 1)
        for k, (a, b) in enumerate(wiring, start=1):
            last[a] = last[b] = k
        self._last_use: tuple[int, ...] = tuple(last)
        # the last state at each stride is a feature tap
        self.taps = tuple(max(i for i, s in enumerate(strides) if s == st) for st in sorted(set(strides)))
        self.stage_info = [
            FeatureInfo("conv0" if i == 0 else f"cells.{i - 1}", widths[i], strides[i]) for i in self.taps
        ]
        if [f.stride for f in self.stage_info] != [2, 4, 8, 16, 32]:
            raise ValueError(f"the plan gives feature strides {[f.stride for f in self.stage_info]}, not 2..32")
        self.head = ClassifierHead(widths[-1], num_classes, drop_rate)
        self.aux_heads = nn.ModuleList([AuxHead(widths[self.taps[3]], num_classes, aux_grid)]) if aux_logits else None
        init_weights(self)

    def set_drop_path_progress(self, progress: float) -> None:
        """Scheduled drop-path: the fraction of training done (the rate ramps linearly with it)."""
        for m in self.modules():
            if isinstance(m, ScheduledDropPath):
                m.set_progress(progress)

    def stages(self, x: Tensor):
        x = self.conv0(x)
        states: list[Tensor | None] = [x]
        taps, last_use = self.taps, self._last_use
        t = 0
        if taps[0] == 0:
            yield x
            t = 1
        for i, (cell, (a, b)) in enumerate(zip(self.cells, self.wiring), start=1):
            states.append(cell(states[a], states[b]))
            if t < len(taps) and taps[t] == i:
                yield F.relu(states[i])
                t += 1
            for j in (a, b):  # free the states no later cell reads
                if last_use[j] <= i:
                    states[j] = None

    def forward(self, x: Tensor):
        if self.features_only:
            return self.forward_levels(x)
        self.check_input(x)
        feats = list(self.stages(x))
        logits = self.forward_head(feats[-1])
        if self.training and getattr(self, "aux_heads", None) is not None:
            return logits, self.aux_heads[0](feats[3])
        return logits
