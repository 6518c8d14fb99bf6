"""RetinaNet pre- and post-processing of images and boxes (batched).

``Preprocess`` does what torchvision's ``GeneralizedRCNNTransform`` does, in the same order so
that the pixels are the same: normalise with ``image_mean`` / ``image_std``, resize (bilinear)
so that the shorter side is ``min_size`` unless the longer would exceed ``max_size`` (aspect
ratio kept, output size ``floor(side * scale)``), and pad bottom/right with zeros to a multiple
of ``size_divisible``. A batch tensor (or a list of same-size images) is resized in one call;
images of different sizes are resized one by one and padded into one batch. Ground-truth boxes
are scaled with the image.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Preprocess", "ImageBatch", "backbone_normalization"]


def backbone_normalization(backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a backbone's inputs are normalised with: those of the published weights it was loaded
    with (``backbone.pretrained_weights``), else its network's training set's (``backbone.spec``), else what an
    adapted timm / torchvision module says (``backbone.normalization``: timm's ``pretrained_cfg``), else
    ImageNet's (a backbone instance that says nothing)."""
    weights = getattr(backbone, "pretrained_weights", None)
    if weights is not None:
        return tuple(weights.mean), tuple(weights.std)
    given = getattr(backbone, "normalization", None)
    if given is not None:
        return tuple(given[0]), tuple(given[1])
    spec = getattr(backbone, "spec", None)
    if spec is not None:
        return tuple(spec.mean), tuple(spec.std)
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


class ImageBatch:
    """The padded batch, the resized size of every image and the size it came in."""

    __slots__ = ("tensor", "image_sizes", "original_sizes")

    def __init__(self, tensor: Tensor, image_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]]):
        self.tensor = tensor
        self.image_sizes = image_sizes
        self.original_sizes = original_sizes


def _scale_boxes(boxes: Tensor, old: Sequence[int], new: Sequence[int]) -> Tensor:
    # torchvision's resize_boxes: float32 ratios new / old per axis
    rh = torch.tensor(new[0], dtype=torch.float32, device=boxes.device) / torch.tensor(
        old[0], dtype=torch.float32, device=boxes.device)
    rw = torch.tensor(new[1], dtype=torch.float32, device=boxes.device) / torch.tensor(
        old[1], dtype=torch.float32, device=boxes.device)
    ratio = torch.stack((rw, rh, rw, rh))
    return boxes * ratio


class Preprocess(nn.Module):
    def __init__(self, min_size: int | Sequence[int] = 800, max_size: int = 1333, image_mean=None, image_std=None,
                 size_divisible: int = 32):
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
        self.max_size = int(max_size)
        self.size_divisible = int(size_divisible)
        mean = torch.tensor(IMAGENET_MEAN if image_mean is None else image_mean, dtype=torch.float32)
        std = torch.tensor(IMAGENET_STD if image_std is None else image_std, dtype=torch.float32)
        self.register_buffer("image_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", std.view(1, -1, 1, 1), persistent=False)

    def _target_size(self) -> int:
        # multi-scale training picks one shorter side per batch (torchvision: per image)
        if self.training and len(self.min_size) > 1:
            return random.choice(self.min_size)
        return self.min_size[-1]

    def _resize(self, x: Tensor, size: int, max_size: int) -> Tensor:
        h, w = x.shape[-2:]
        scale = min(size / min(h, w), max_size / max(h, w))
        return F.interpolate(x, scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                             align_corners=False)

    def _normalize(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"RetinaNet takes float images in 0..1, got dtype {x.dtype}: convert with .float() / 255")
        return (x - self.image_mean.to(x.dtype)) / self.image_std.to(x.dtype)

    def _pad(self, x: Tensor) -> Tensor:
        d = self.size_divisible
        h, w = x.shape[-2:]
        ph, pw = int(math.ceil(h / d) * d) - h, int(math.ceil(w / d) * d) - w
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def forward(self, images, targets: list[dict[str, Tensor]] | None = None,
                size: int | None = None) -> tuple[ImageBatch, list | None]:
        """``size`` replaces ``min_size`` for this call (progressive resizing in training), with
        ``max_size`` scaled in proportion."""
        if isinstance(images, Tensor):
            if images.dim() == 3:
                images = images[None]
            if images.dim() != 4:
                raise ValueError(f"images must be B x 3 x H x W or a list of 3 x H x W, got {tuple(images.shape)}")
            same = True
        else:
            images = list(images)
            if not images:
                raise ValueError("images is an empty list")
            for i, im in enumerate(images):
                if im.dim() != 3:
                    raise ValueError(f"images[{i}] must be 3 x H x W, got shape {tuple(im.shape)}")
            same = all(im.shape == images[0].shape for im in images)
            if same:
                images = torch.stack(images)
        if size is None:
            size, max_size = self._target_size(), self.max_size
        else:
            size = int(size)
            max_size = max(size, int(round(self.max_size * size / self.min_size[-1])))
        if same:
            orig = [tuple(int(s) for s in images.shape[-2:])] * images.shape[0]
            x = self._resize(self._normalize(images), size, max_size)
            sizes = [tuple(int(s) for s in x.shape[-2:])] * x.shape[0]
            x = self._pad(x)
        else:
            orig = [tuple(int(s) for s in im.shape[-2:]) for im in images]
            resized = [self._resize(self._normalize(im[None]), size, max_size)[0] for im in images]
            sizes = [tuple(int(s) for s in r.shape[-2:]) for r in resized]
            hmax = max(s[0] for s in sizes)
            wmax = max(s[1] for s in sizes)
            d = self.size_divisible
            hmax, wmax = int(math.ceil(hmax / d) * d), int(math.ceil(wmax / d) * d)
            x = resized[0].new_zeros(len(resized), resized[0].shape[0], hmax, wmax)
            for i, r in enumerate(resized):
                x[i, :, : r.shape[1], : r.shape[2]].copy_(r)
        if targets is not None:
            if len(targets) != x.shape[0]:
                raise ValueError(f"{x.shape[0]} images but {len(targets)} targets")
            targets = [dict(t, boxes=_scale_boxes(t["boxes"].float(), o, s)) for t, o, s in zip(targets, orig, sizes)]
        return ImageBatch(x, sizes, orig), targets
