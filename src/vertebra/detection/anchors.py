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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator", "default_anchor_sizes", "DEFAULT_ASPECT_RATIOS"]

DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def default_anchor_sizes(levels: Sequence[int], scales_per_octave: int = 3) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes of the paper: 4 x stride of each level, times 2^(i/scales_per_octave)."""
    return tuple(
        tuple(int(4 * 2**lvl * 2 ** (i / scales_per_octave)) for i in range(scales_per_octave)) for lvl in levels
    )


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
