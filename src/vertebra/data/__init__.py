"""Data: COCO / Pascal VOC detection sets, image folders and CIFAR for classification, the built-in *shapes*
set, and ``torchvision.transforms.v2`` pipelines. See :mod:`vertebra.data.common` for the conventions
(image and target layout, errors, ``skip_bad``)."""

from .cifar import CIFAR, CIFAR10, CIFAR100, read_cifar_batch
from .coco import CocoDetection, load_coco_json
from .common import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    DataError,
    DetectionDataset,
    ImageError,
    ImageRecord,
    MissingImageError,
    collate_classification,
    collate_detection,
    image_size,
    is_video,
    read_image,
    read_video_frames,
)
from .folder import ImageFolder
from .shapes import SHAPE_CLASSES, load_shapes, render_shapes_image, write_shapes
from .transforms import classification_transforms, detection_transforms
from .voc import VOC_CLASSES, VOCDetection, parse_voc_xml

__all__ = [
    "CIFAR",
    "CIFAR10",
    "CIFAR100",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "is_video",
    "read_video_frames",
    "SHAPE_CLASSES",
    "VOC_CLASSES",
    "CocoDetection",
    "DataError",
    "DetectionDataset",
    "ImageError",
    "ImageFolder",
    "ImageRecord",
    "MissingImageError",
    "VOCDetection",
    "classification_transforms",
    "collate_classification",
    "collate_detection",
    "detection_transforms",
    "image_size",
    "load_coco_json",
    "load_shapes",
    "parse_voc_xml",
    "read_cifar_batch",
    "read_image",
    "render_shapes_image",
    "write_shapes",
]
