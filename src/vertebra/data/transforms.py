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
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["DetectionTrainTransform", "detection_transforms", "classification_transforms", "weights_transforms",
           "box_labels_getter", "PER_BOX_KEYS"]

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


class DetectionTrainTransform:
    """The detection training pipeline, ``t(image, target) -> (image, target)``: the image as float 0..1, a
    ColorJitter (brightness, contrast, saturation 0.3, hue 0.03; with probability 0.8) when ``photometric``, a
    horizontal flip with probability ``hflip``, the shorter side resized to one of ``sizes`` (drawn; the longer
    side at most ``max_size``), boxes clamped to the image and the boxes (and their per-box entries) with a side
    under ``min_box_size`` px removed.

    The operations, their order and their random draws are those of the ``torchvision.transforms.v2.Compose`` of
    ``ToImage, ToDtype, RandomApply(ColorJitter), RandomHorizontalFlip, RandomShortestSize, ClampBoundingBoxes,
    SanitizeBoundingBoxes`` (so a seed gives the same sample), called as v2's functional kernels on the image and
    the boxes directly: the Compose's flattening and rewrapping of the target per sample cost as much as the
    operations on a small image (``benchmarks/RESULTS.md``, shapes_retinanet 2026-12-07)."""

    def __init__(self, sizes: Sequence[int], max_size: int, *, hflip: float = 0.5, photometric: bool = True,
                 min_box_size: float = 1.0):
        self.sizes, self.max_size = [int(s) for s in sizes], int(max_size)
        self.hflip, self.min_box_size = float(hflip), float(min_box_size)
        self.jitter = v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)],
                                     p=0.8) if photometric else None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sizes={self.sizes}, max_size={self.max_size}, hflip={self.hflip}, "
                f"photometric={self.jitter is not None}, min_box_size={self.min_box_size})")

    def __call__(self, image, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        img = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        boxes = target["boxes"]
        if self.jitter is not None:
            img = self.jitter(img)
        if self.hflip > 0 and not torch.rand(1) >= self.hflip:  # RandomHorizontalFlip's draw
            img, boxes = TF.horizontal_flip(img), TF.horizontal_flip(boxes)
        h, w = img.shape[-2:]
        short = self.sizes[int(torch.randint(len(self.sizes), ()))]  # RandomShortestSize's draw and rule
        r = min(short / min(h, w), self.max_size / max(h, w))
        new = (int(h * r), int(w * r))
        img, boxes = TF.resize(img, list(new), antialias=True), TF.resize(boxes, list(new))
        boxes = TF.clamp_bounding_boxes(boxes)
        valid = TF._misc._get_sanitize_bounding_boxes_mask(boxes, format=boxes.format, canvas_size=boxes.canvas_size,
                                                           min_size=self.min_box_size, min_area=self.min_box_size**2)
        out = dict(target)
        out["boxes"] = tv_tensors.wrap(boxes[valid], like=boxes)
        for k in PER_BOX_KEYS:
            if k in out:
                out[k] = out[k][valid]
        return img, out


def detection_transforms(
    train: bool,
    size: int = 512,
    *,
    max_size: int | None = None,
    scale_range: tuple[float, float] = (0.75, 1.25),
    hflip: float = 0.5,
    photometric: bool = True,
    min_box_size: float = 1.0,
):
    """Detection pipeline: resize keeping the aspect ratio (shorter side to ``size``, longer side at most
    ``max_size``, default ``size * 1333 / 800``).

    Training (:class:`DetectionTrainTransform`) adds, in order: a ColorJitter (brightness, contrast, saturation
    0.3, hue 0.03; applied with probability 0.8) when ``photometric``, a horizontal flip with probability
    ``hflip``, scale jitter (the shorter side drawn from 9 sizes spanning ``scale_range`` x ``size``, the cap
    scaled likewise), box clamping and removal of boxes smaller than ``min_box_size`` px. Evaluation only resizes
    (a ``v2.Compose``).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    max_size = _default_max_size(size) if max_size is None else int(max_size)
    if max_size < size:
        raise ValueError(f"max_size {max_size} < size {size}")
    if not train:
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                           v2.Resize(size, max_size=max_size, antialias=True)])
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
    sizes = sorted({max(1, int(round(size * (lo + (hi - lo) * k / 8)))) for k in range(9)})
    return DetectionTrainTransform(sizes, int(round(max_size * hi)), hflip=hflip, photometric=photometric,
                                   min_box_size=min_box_size)


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
