"""Anchors of RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, 1708.02002).

Sec. 4 of the paper: on pyramid levels P3-P7 the anchors have areas 32^2 ... 512^2 (4x the
level's stride), three scales {2^0, 2^(1/3), 2^(2/3)} and three aspect ratios {1:2, 1:1, 2:1}:
A = 9 anchors per location. An optional P2 (``min_level=2``) adds 16^2 anchors for small objects.

The anchors are laid out exactly as torchvision's ``AnchorGenerator`` does, so that a head trained
there decodes the same here: zero-centred cell anchors rounded to integers (ratio-major, then
scale), shifted by ``(x * stride_w, y * stride_h)`` for every feature-map cell in row-major order
(cells outer, anchors inner), with the stride of a level taken as ``padded_image_size //
feature_size`` (for P6/P7 of an 800-pixel image that is 61 and 114, not 64 and 128: torchvision's
convention, kept for parity). Sizes are truncated as torchvision does: ``int(32 * 2 ** (1/3)) = 40``.

The anchors of a batch are the same for every image (images are padded to one size): one
``[sum(H*W*A), 4]`` tensor, cached per (feature sizes, image size, dtype, device).

Anchors that fit the data (:func:`fit_anchors`): the paper's sizes are made for COCO at 800 px; on other
objects (a 256-px set of 5-130 px shapes, small objects) many boxes have no anchor at IoU 0.5, the IoU
matcher's foreground threshold, and never train the box branch. :func:`box_sample` takes a data set's boxes
at the detector's input scale, :func:`anchor_coverage` measures, on the real anchor grid of each image,
the share of boxes whose best anchor reaches IoU 0.5 and the level that gives it, and :func:`fit_anchors`
chooses the base size (a multiple of the stride) and the top level that cover the most boxes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "default_anchor_sizes", "scaled_anchor_sizes", "DEFAULT_ASPECT_RATIOS", "BoxSample",
           "box_sample", "anchor_coverage", "AnchorFit", "fit_anchors", "box_statistics"]

DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def default_anchor_sizes(levels: Sequence[int], scales_per_octave: int = 3) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes of the paper: 4 x stride of each level, times 2^(i/scales_per_octave)."""
    return tuple(
        tuple(int(4 * 2**lvl * 2 ** (i / scales_per_octave)) for i in range(scales_per_octave)) for lvl in levels
    )


def scaled_anchor_sizes(mult: float, levels: Sequence[int], scales_per_octave: int = 3) -> list[list[int]]:
    """Anchor sizes ``mult x stride x 2^(i/scales_per_octave)`` of each level (the paper: ``mult`` 4)."""
    return [[int(round(mult * 2**lvl * 2 ** (i / scales_per_octave))) for i in range(scales_per_octave)]
            for lvl in levels]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Zero-centred anchors ``[len(ratios) * len(sizes), 4]`` (ratio-major), ratio = height / width."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for a list of feature maps of one padded image size.

    ``sizes[i]`` and ``aspect_ratios[i]`` belong to level i; ``aspect_ratios`` may also be one
    sequence used on every level. ``forward(image_size, feature_sizes)`` returns the anchors
    ``[sum(H_i * W_i * A_i), 4]`` (xyxy, float32 unless ``dtype`` says otherwise).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios=DEFAULT_ASPECT_RATIOS, cache_size: int = 16):
        super().__init__()
        sizes = tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in sizes)
        if aspect_ratios and not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        if len(aspect_ratios) != len(sizes):
            raise ValueError(
                f"anchor_sizes gives {len(sizes)} levels but aspect_ratios {len(aspect_ratios)}: give one tuple of "
                "ratios per level, or one tuple for all levels"
            )
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self._cells = [cell_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self._cache_size = cache_size

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]], dtype, device) -> Tensor:
        if len(feature_sizes) != len(self._cells):
            raise ValueError(f"{len(feature_sizes)} feature maps but anchors for {len(self._cells)} levels")
        out = []
        img_h, img_w = int(image_size[0]), int(image_size[1])
        for (gh, gw), cell in zip(feature_sizes, self._cells):
            gh, gw = int(gh), int(gw)
            sh, sw = img_h // gh, img_w // gw
            xs = torch.arange(gw, dtype=torch.int32, device=device) * sw
            ys = torch.arange(gh, dtype=torch.int32, device=device) * sh
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            base = cell.to(dtype=dtype, device=device)
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(out)

    def forward(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]],
                dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (tuple(int(v) for v in image_size), tuple((int(h), int(w)) for h, w in feature_sizes), dtype, device)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        anchors = self.grid_anchors(image_size, feature_sizes, dtype, device)
        self._cache[key] = anchors
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return anchors

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}"


# --------------------------------------------------------------------------------------------- fitting to data


@dataclass
class BoxSample:
    """A data set's boxes at the detector's input scale: ``boxes[i]`` (``[N_i, 4]`` xyxy) of the image whose padded
    input is ``sizes[i]`` (h, w); ``images`` of the set were looked at (all, or a seeded sample)."""

    boxes: list[Tensor]
    sizes: list[tuple[int, int]]
    images: int
    total_images: int

    @property
    def num_boxes(self) -> int:
        return int(sum(len(b) for b in self.boxes))

    def all_boxes(self) -> Tensor:
        return torch.cat(self.boxes) if self.boxes else torch.zeros(0, 4)


def box_sample(records, size: int, max_size: int | None = None, size_divisible: int = 32,
               limit: int | None = None, seed: int = 0) -> BoxSample:
    """The boxes of ``records`` (a detection set's :class:`~vertebra.data.common.ImageRecord` s: ``boxes``,
    ``height``, ``width``) resized as the detector resizes its input: shorter side ``size``, longer at most
    ``max_size`` (default ``size x 1333 / 800``), padded to ``size_divisible``. ``limit``: a seeded sample of that
    many images (the statistics of a large set in seconds)."""
    records = list(records)
    total = len(records)
    if limit is not None and total > limit:
        g = torch.Generator().manual_seed(seed)
        records = [records[i] for i in torch.randperm(total, generator=g)[:limit].tolist()]
    max_size = int(math.ceil(size * 1333 / 800)) if max_size is None else int(max_size)
    boxes, sizes = [], []
    for r in records:
        h, w = int(r.height), int(r.width)
        scale = min(size / min(h, w), max_size / max(h, w))
        nh, nw = int(math.floor(h * scale)), int(math.floor(w * scale))
        ph = int(math.ceil(nh / size_divisible) * size_divisible)
        pw = int(math.ceil(nw / size_divisible) * size_divisible)
        b = torch.as_tensor(r.boxes, dtype=torch.float32).reshape(-1, 4)
        boxes.append(b * torch.tensor([nw / w, nh / h, nw / w, nh / h]))
        sizes.append((ph, pw))
    return BoxSample(boxes, sizes, len(records), total)


def _level_ious(sample: BoxSample, sizes: Sequence[Sequence[float]], levels: Sequence[int],
                aspect_ratios: Sequence[float]) -> Tensor:
    """``[len(levels), num_boxes]``: each box's best IoU with the anchors of each level, on its image's grid
    (P3-P5 at the backbone's strides; each level above halves the one below, rounding up)."""
    from .boxes import box_iou_batched

    gens = [AnchorGenerator([s], aspect_ratios) for s in sizes]
    out = torch.zeros(len(levels), sample.num_boxes)
    # the images of one padded size share their anchors: one IoU pass per (size, level), boxes of all of them
    groups: dict[tuple[int, int], list[tuple[int, Tensor]]] = {}
    col = 0
    for b, hw in zip(sample.boxes, sample.sizes):
        if len(b):
            groups.setdefault(tuple(hw), []).append((col, b))
        col += len(b)
    for (h, w), items in groups.items():
        cols = torch.cat([torch.arange(c, c + len(b)) for c, b in items])
        boxes = torch.cat([b for _, b in items])
        fh, fw = h, w
        feats = {}
        for lvl in range(1, max(levels) + 1):
            fh, fw = -(-fh // 2), -(-fw // 2)
            feats[lvl] = (fh, fw)
        for i, (lvl, gen) in enumerate(zip(levels, gens)):
            anchors = gen((h, w), [feats[lvl]])
            for k in range(0, len(boxes), 1024):  # [1024, anchors] at a time
                out[i, cols[k:k + 1024]] = box_iou_batched(boxes[None, k:k + 1024], anchors)[0].amax(dim=1)
    return out


def anchor_coverage(sample: BoxSample, anchor_sizes: Sequence[Sequence[float]], levels: Sequence[int],
                    aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS, iou: float = 0.5) -> dict:
    """How well anchors fit ``sample``: ``covered`` (the share of boxes whose best anchor reaches ``iou``),
    ``median_best_iou``, and ``per_level`` (the share of boxes whose best anchor is on each level)."""
    if sample.num_boxes == 0:
        return {"covered": float("nan"), "median_best_iou": float("nan"), "per_level": {}, "boxes": 0}
    ious = _level_ious(sample, anchor_sizes, levels, aspect_ratios)
    best, where = ious.max(dim=0)
    per_level = {f"P{lvl}": float((where == i).float().mean()) for i, lvl in enumerate(levels)}
    return {"covered": float((best >= iou).float().mean()), "median_best_iou": float(best.median()),
            "per_level": per_level, "boxes": sample.num_boxes}


@dataclass
class AnchorFit:
    """The anchors :func:`fit_anchors` chose: sizes ``mult x stride x 2^(0, 1/3, 2/3)`` on ``P{min_level}``-
    ``P{max_level}``, the share of boxes they cover at IoU 0.5 and that of the paper's (4 x stride, P3-P7)."""

    mult: float
    min_level: int
    max_level: int
    anchor_sizes: list[list[int]]
    covered: float
    paper_covered: float
    per_level: dict[str, float] = field(default_factory=dict)
    boxes: int = 0
    images: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def describe(self) -> str:
        return (f"{self.mult:g} x stride on P{self.min_level}-P{self.max_level} (sizes "
                f"{self.anchor_sizes[0][0]}-{self.anchor_sizes[-1][-1]} px) cover {100 * self.covered:.1f}% of "
                f"{self.boxes} boxes at IoU 0.5 (the paper's 4 x stride on P3-P7: {100 * self.paper_covered:.1f}%)")


#: the base sizes (multiples of the stride) and top levels :func:`fit_anchors` chooses from
FIT_MULTS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
FIT_MAX_LEVELS = (5, 6, 7)


def fit_anchors(sample: BoxSample, min_level: int | Sequence[int] = 3, max_levels: Sequence[int] = FIT_MAX_LEVELS,
                mults: Sequence[float] = FIT_MULTS, aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
                iou: float = 0.5, tolerance: float = 0.005, p2_gain: float = 0.10,
                p3_enough: float = 0.75) -> AnchorFit:
    """The base size and levels that cover the most boxes of ``sample`` at ``iou`` on the real anchor grid.
    ``min_level``: the bottom level, or several to choose from (``(2, 3)``: P2 is taken only where the best choice
    from P3 covers less than ``p3_enough`` of the boxes and P2 covers ``p2_gain`` more, since its map has four times
    the cells of P3's and about doubles a light detector's compute). Among
    choices within ``tolerance`` of the best, the one with fewer levels (less compute), then the base size nearest
    the paper's 4 x stride is kept. A sample without boxes keeps the paper's anchors on P3-P7."""
    bottoms = sorted({int(m) for m in ([min_level] if isinstance(min_level, int) else min_level)}, reverse=True)
    top_all = max(max_levels)
    if sample.num_boxes == 0:
        levels = list(range(3, top_all + 1))
        return AnchorFit(4.0, 3, top_all, [list(map(int, s)) for s in default_anchor_sizes(levels)],
                         float("nan"), float("nan"), boxes=0, images=sample.images)
    lo = min(bottoms)
    levels_all = list(range(lo, top_all + 1))
    per_mult = {m: _level_ious(sample, scaled_anchor_sizes(m, levels_all), levels_all, aspect_ratios) for m in mults}
    p3 = levels_all.index(3) if 3 in levels_all else 0
    paper_ious = per_mult[4.0] if 4.0 in per_mult else _level_ious(
        sample, scaled_anchor_sizes(4.0, levels_all), levels_all, aspect_ratios)
    paper_cov = float((paper_ious[p3:].amax(dim=0) >= iou).float().mean())
    best_choice = None
    for bottom in bottoms:  # P3 first: P2 has to earn its cost
        b = levels_all.index(bottom)
        choices = []
        for m, ious in per_mult.items():
            for top in max_levels:
                cov = float((ious[b:top - lo + 1].amax(dim=0) >= iou).float().mean())
                choices.append((cov, bottom, top, m))
        best_cov = max(c[0] for c in choices)
        near = [c for c in choices if c[0] >= best_cov - tolerance]
        pick = min(near, key=lambda c: (c[2], abs(math.log(c[3] / 4.0))))
        if best_choice is None or (best_choice[0] < p3_enough and pick[0] >= best_choice[0] + p2_gain):
            best_choice = pick
    cov, bottom, top, m = best_choice
    levels = list(range(bottom, top + 1))
    b = levels_all.index(bottom)
    where = per_mult[m][b:top - lo + 1].argmax(dim=0)
    per_level = {f"P{lvl}": float((where == i).float().mean()) for i, lvl in enumerate(levels)}
    return AnchorFit(m, bottom, top, scaled_anchor_sizes(m, levels), cov, paper_cov, per_level,
                     sample.num_boxes, sample.images)


def _percentiles(x: Tensor, qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, float]:
    if x.numel() == 0:
        return {f"p{int(q * 100)}": float("nan") for q in qs}
    return {f"p{int(q * 100)}": float(torch.quantile(x.float(), q)) for q in qs}


def box_statistics(sample: BoxSample) -> dict:
    """Box sizes (square root of the area, px at the input scale), aspect ratios (height / width) and objects per
    image of ``sample``, as percentiles; ``max`` objects in one image."""
    b = sample.all_boxes()
    w, h = (b[:, 2] - b[:, 0]).clamp(min=1e-6), (b[:, 3] - b[:, 1]).clamp(min=1e-6)
    per_image = torch.tensor([len(x) for x in sample.boxes], dtype=torch.float32)
    return {"images": sample.images, "boxes": sample.num_boxes, "size": _percentiles((w * h).sqrt()),
            "aspect": _percentiles(h / w), "per_image": {**_percentiles(per_image),
                                                         "mean": float(per_image.mean()) if len(per_image) else 0.0,
                                                         "max": int(per_image.max()) if len(per_image) else 0}}
