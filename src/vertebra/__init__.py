"""vertebra: the classic CNN backbones of object detection, faithful to their papers."""

from .backbone import Backbone, FeatureInfo
from .inference import optimize_for_inference
from .registry import BackboneSpec, backbone_spec, create_backbone, list_backbones, list_models
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
    "backbone_spec",
    "create_backbone",
    "create_detector",
    "list_backbones",
    "list_models",
    "load_reference_weights",
    "optimize_for_inference",
]
