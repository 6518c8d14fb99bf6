"""Detectors on vertebra backbones: RetinaNet (FPN + focal loss).

``create_detector("retinanet", backbone="resnet50", num_classes=80, **kw)``; the keyword
arguments follow torchvision's RetinaNet (``min_size=800, max_size=1333, image_mean, image_std,
score_thresh=0.05, nms_thresh=0.5, detections_per_img=300, topk_candidates=1000``) plus
``anchor_sizes, aspect_ratios, trainable_stages=3, frozen_bn=True, backbone_weights, head_norm,
fpn_channels=256, p6_from="p5", min_level=3, max_level=7, head_convs=4, matcher="iou" | "atss",
box_loss="l1" | "giou"``
(see ``retinanet.build_retinanet``).
"""

from __future__ import annotations

from .anchors import AnchorGenerator
from .fpn import FPN
from .head import RetinaNetHead
from .postprocess import Postprocess
from .retinanet import RetinaNet, RetinaNetCore, build_retinanet, validate_targets
from .transform import Preprocess

__all__ = [
    "AnchorGenerator",
    "FPN",
    "Postprocess",
    "Preprocess",
    "RetinaNet",
    "RetinaNetHead",
    "RetinaNetCore",
    "create_detector",
    "list_detectors",
    "validate_targets",
]

_DETECTORS = {"retinanet": build_retinanet}


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)


def create_detector(name: str = "retinanet", *, backbone="resnet50", num_classes: int = 91, **kwargs) -> RetinaNet:
    """Build a detector by name on a registered backbone (or a vertebra Backbone instance)."""
    key = str(name).lower()
    if key not in _DETECTORS:
        raise KeyError(f"unknown detector {name!r}; vertebra has: {', '.join(list_detectors())}")
    return _DETECTORS[key](backbone, num_classes, **kwargs)
