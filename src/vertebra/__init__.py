"""vertebra: the classic CNN backbones of object detection, faithful to their papers."""

from .backbone import Backbone, FeatureInfo
from .inference import optimize_for_inference
from .registry import BackboneSpec, backbone_spec, create_backbone, list_backbones
from .weights import load_reference_weights

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "BackboneSpec",
    "FeatureInfo",
    "backbone_spec",
    "create_backbone",
    "list_backbones",
    "load_reference_weights",
    "optimize_for_inference",
]
