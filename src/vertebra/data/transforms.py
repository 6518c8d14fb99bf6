"""Training and evaluation pipelines on ``torchvision.transforms.v2`` (boxes travel as ``tv_tensors.BoundingBoxes``).

Detection transforms are called as ``t(image, target)`` on the datasets' output and keep every per-box
tensor of the target (``labels``, ``difficult``, ``iscrowd``) aligned with the boxes: boxes that become
degenerate (smaller than ``min_box_size`` pixels on a side after resizing/clamping) are removed with
``SanitizeBoundingBoxes`` in training. ``image_id`` and ``orig_size`` pass through unchanged, so predictions
made at the transformed size can be mapped back with ``orig_size / image.shape[-2:]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

__all__ = ["detection_transforms", "classification_transforms", "weights_transforms", "box_labels_getter",
           "PER_BOX_KEYS"]

# target entries that hold one value per box and must be filtered together with the boxes
PER_BOX_KEYS = ("labels", "difficult", "iscrowd")


def box_labels_getter(inputs: Any) -> tuple[torch.Tensor, ...]:
    """For ``SanitizeBoundingBoxes``: the per-box tensors of the target dict found among ``inputs``."""
    stack = [inputs]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if "boxes" in x:
                return tuple(x[k] for k in PER_BOX_KEYS if k in x)
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    raise ValueError("no target dict with 'boxes' among the transform's inputs")


def _default_max_size(size: int) -> int:
    return int(math.ceil(size * 1333 / 800))


def detection_transforms(
    train: bool,
    size: int = 512,
    *,
    max_size: int | None = None,
    scale_range: tuple[float, float] = (0.75, 1.25),
    hflip: float = 0.5,
    photometric: bool = True,
    min_box_size: float = 1.0,
) -> v2.Compose:
    """Detection pipeline: resize keeping the aspect ratio (shorter side to ``size``, longer side at most
    ``max_size``, default ``size * 1333 / 800``).

    Training adds, in order: a ColorJitter (brightness, contrast, saturation 0.3, hue 0.03; applied with
    probability 0.8) when ``photometric``, a horizontal flip with probability ``hflip``, scale jitter (the
    shorter side drawn from 9 sizes spanning ``scale_range`` x ``size``, the cap scaled likewise), box
    clamping and removal of boxes smaller than ``min_box_size`` px. Evaluation only resizes.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    max_size = _default_max_size(size) if max_size is None else int(max_size)
    if max_size < size:
        raise ValueError(f"max_size {max_size} < size {size}")
    ops: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if not train:
        ops.append(v2.Resize(size, max_size=max_size, antialias=True))
        return v2.Compose(ops)
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
    if photometric:
        ops.append(v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)], p=0.8))
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    sizes = sorted({max(1, int(round(size * (lo + (hi - lo) * k / 8)))) for k in range(9)})
    ops.append(v2.RandomShortestSize(min_size=sizes, max_size=int(round(max_size * hi)), antialias=True))
    ops.append(v2.ClampBoundingBoxes())
    ops.append(v2.SanitizeBoundingBoxes(min_size=min_box_size, min_area=min_box_size**2,
                                        labels_getter=box_labels_getter))
    return v2.Compose(ops)


def classification_transforms(
    train: bool,
    size: int = 224,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = 0.875,
) -> v2.Compose:
    """Classification pipeline producing ``size`` x ``size`` float images (0..1, or normalized if mean/std given).

    Small images (``size <= 64``, CIFAR/MNIST style): training pads by ``size // 8`` and crops at random,
    then flips; evaluation resizes and center-crops. Larger: training uses RandomResizedCrop + flip + a mild
    ColorJitter; evaluation resizes the shorter side to ``size / crop_pct`` and center-crops.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    ops: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if size <= 64:
        ops += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        if train:
            ops += [v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()]
    elif train:
        ops += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2)], p=0.5)]
    else:
        ops += [v2.Resize(int(round(size / crop_pct)), antialias=True), v2.CenterCrop(size)]
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        ops.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(ops)


def weights_transforms(weights) -> v2.Compose:
    """The evaluation preprocessing published weights expect (a :class:`vertebra.hub.Weights` entry, or
    anything with its ``input_size``, ``crop_pct``, ``interpolation``, ``mean`` and ``std``): the image as float
    0..1, the shorter side resized to ``floor(size / crop_pct)`` with the weights' interpolation (antialiased),
    a center crop of ``size`` x ``size``, normalised with the weights' mean / std. On a float image it equals
    torchvision's ``weights.transforms()``; on 8-bit pixels torchvision (and timm, on PIL images) resize in
    8 bits, which differs by rounding (at most one grey level). Takes a PIL image or a 3 x H x W tensor.
    """
    size = int(weights.input_size[-1])
    # torchvision's crop_pct is crop / resize (224 / 232): the epsilon keeps 232 from flooring to 231
    resize = int(math.floor(size / float(weights.crop_pct) + 1e-6))
    modes = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
             "nearest": v2.InterpolationMode.NEAREST}
    if weights.interpolation not in modes:
        raise ValueError(f"interpolation must be one of {', '.join(modes)}, got {weights.interpolation!r}")
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Resize(resize, interpolation=modes[weights.interpolation], antialias=True),
                       v2.CenterCrop(size), v2.Normalize(mean=list(weights.mean), std=list(weights.std))])
