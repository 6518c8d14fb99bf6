"""vertebra: the classic CNN backbones of object detection, faithful to their papers.

timm's habits work on the same concepts: ``vertebra.create_model`` (= ``create_backbone``: ``pretrained``,
``features_only``, ``out_indices``, ``checkpoint_path``), ``vertebra.list_models("resnet*", pretrained=True)``,
``model.forward_features`` / ``forward_head`` / ``forward_intermediates``, ``model.feature_info.channels()`` /
``.reduction()``, ``model.get_classifier()`` / ``reset_classifier(n)``; ``create_detector`` takes a timm
``features_only`` model or a torchvision feature extractor as its backbone."""

from .backbone import Backbone, FeatureInfo, FeatureInfoList
from .inference import optimize_for_inference
from .registry import BackboneSpec, backbone_spec, create_backbone, create_model, list_backbones, list_models
from .weights import load_reference_weights

__version__ = "0.1.0"


def create_detector(name: str = "retinanet", **kwargs):
    """``create_detector("retinanet", backbone="resnet50", num_classes=80, pretrained=None, **kw) -> RetinaNet``;
    kw names and defaults follow torchvision's RetinaNet (see ``vertebra.detection.build_retinanet``);
    ``pretrained="coco"``: a COCO-trained RetinaNet (``vertebra.detection.create_detector``)."""
    from .detection import create_detector as _create

    return _create(name, **kwargs)


__all__ = [
    "Backbone",
    "BackboneSpec",
    "FeatureInfo",
    "FeatureInfoList",
    "backbone_spec",
    "create_backbone",
    "create_detector",
    "create_model",
    "list_backbones",
    "list_models",
    "load_reference_weights",
    "optimize_for_inference",
]
