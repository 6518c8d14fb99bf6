"""Detectors on vertebra backbones: RetinaNet (FPN + focal loss).

``create_detector("retinanet", backbone="resnet50", num_classes=80, **kw)``; the keyword
arguments follow torchvision's RetinaNet (``min_size=800, max_size=1333, image_mean, image_std,
score_thresh=0.05, nms_thresh=0.5, detections_per_img=300, topk_candidates=1000``) plus
``anchor_sizes, aspect_ratios, trainable_stages=3, frozen_bn=True, backbone_weights, head_norm,
fpn_channels=256, p6_from="p5", min_level=3, max_level=7, head_convs=4, matcher="iou" | "atss",
box_loss="l1" | "giou"``
(see ``retinanet.build_retinanet``).

``backbone`` may also be a timm or torchvision model that returns feature levels (``adapter.BackboneAdapter``)::

    create_detector("retinanet", backbone=timm.create_model("convnext_tiny", features_only=True), num_classes=3)
    fx = create_feature_extractor(torchvision.models.resnet50(), {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
    create_detector("retinanet", backbone=fx, num_classes=3)  # strides found by one dummy pass, or feature_strides=

``create_detector("retinanet", backbone="resnet50", pretrained="coco")``: the COCO-trained detector with the
highest box AP published for that backbone (torchvision's ``retinanet_resnet50_fpn_v2`` for resnet50);
``pretrained="retinanet_resnet50_fpn"`` (the v1) or ``"retinanet_resnet50_fpn:COCO_V1"`` names one set (see
``retinanet.detector_weights`` and ``retinanet.pretrained_retinanet``); ``model.categories`` holds the class names.
"""

from __future__ import annotations

import inspect

from ..registry import check_kwargs
from .adapter import BackboneAdapter, as_backbone
from .anchors import AnchorGenerator
from .fpn import FPN
from .head import RetinaNetHead
from .postprocess import Postprocess
from .retinanet import (
    RetinaNet,
    RetinaNetCore,
    build_retinanet,
    detector_weights,
    pretrained_retinanet,
    validate_targets,
)
from .transform import Preprocess

__all__ = [
    "AnchorGenerator",
    "BackboneAdapter",
    "FPN",
    "Postprocess",
    "Preprocess",
    "RetinaNet",
    "RetinaNetHead",
    "RetinaNetCore",
    "as_backbone",
    "create_detector",
    "detector_weights",
    "list_detectors",
    "validate_targets",
]

_DETECTORS = {"retinanet": build_retinanet}
#: the builders of the detectors that have published weights (``create_detector(..., pretrained=...)``)
_PRETRAINED = {"retinanet": pretrained_retinanet}


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)


def create_detector(name: str = "retinanet", *, backbone="resnet50", num_classes: int | None = None,
                    pretrained: bool | str | None = None, **kwargs) -> RetinaNet:
    """Build a detector by name on a registered backbone, a vertebra Backbone instance, or a timm / torchvision
    module that returns feature levels.

    ``backbone``: a registry name (``"resnet50"``); a :class:`vertebra.Backbone`; or any ``nn.Module`` whose forward
    returns a list / tuple / dict of ``N x C x H x W`` levels, e.g. ``timm.create_model("convnext_tiny",
    features_only=True)`` or torchvision's ``create_feature_extractor(model, return_nodes={"layer2": "c3", ...})``.
    Such a module is wrapped in :class:`BackboneAdapter`: each level's channels and stride are read from timm's
    ``feature_info``, else found by running one zero image through it at construction (``feature_strides=[8, 16,
    32]`` gives them instead, in the module's order); the FPN takes the levels at strides 8, 16, 32 (P3-P5) and
    adds P6, P7; ``trainable_stages`` counts the levels it returns; ``frozen_bn`` freezes every BatchNorm in it.

    ``num_classes`` defaults to 91 (torchvision's COCO label space). ``pretrained``: None / False, random
    detector weights (``backbone_weights`` may still load the backbone's); ``"coco"`` / True, the COCO-trained
    set with the highest published box AP for ``backbone``; a weights name such as ``"retinanet_resnet50_fpn"`` or
    ``"retinanet_resnet50_fpn:COCO_V1"``, that set (``retinanet.detector_weights``). Pretrained, the model has
    its source's settings, the weights' class count (``num_classes``, if given, must equal it) and
    ``model.categories`` (the names by label); ``kwargs`` override the settings (``score_thresh``, ``min_size``).
    """
    key = str(name).lower()
    if key not in _DETECTORS:
        raise KeyError(f"unknown detector {name!r}; vertebra has: {', '.join(list_detectors())}")
    valid = set(inspect.signature(_DETECTORS[key]).parameters) | {"pretrained"}
    check_kwargs(f"create_detector({name!r})", kwargs, valid)
    if pretrained is not None and pretrained is not False:
        if key not in _PRETRAINED:
            raise KeyError(f"no published weights for the detector {name!r}; detectors with weights: "
                           f"{', '.join(sorted(_PRETRAINED))}")
        return _PRETRAINED[key](backbone, pretrained, num_classes, **kwargs)
    return _DETECTORS[key](backbone, 91 if num_classes is None else num_classes, **kwargs)
