"""What the engine trains: a task says how to open its data, build and describe its model, batch, compute the
loss, evaluate and predict. :class:`DetectionTask` trains a RetinaNet on any backbone, :class:`ClassificationTask`
a backbone as a classifier; :func:`task_for` picks one by its name in a config or checkpoint (``"det"`` /
``"cls"``). Adding a task is adding a class here and an entry in :data:`TASKS`.

A checkpoint describes its model with a :class:`ModelSpec` (saved as the JSON ``state["model"]``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import precision
from ..data.sources import (
    DataSource,
    open_classification,
    open_classification_eval,
    open_detection,
    open_detection_eval,
)
from ..layers.gemm_conv import training_convs
from . import techniques

__all__ = ["ModelSpec", "Task", "DetectionTask", "ClassificationTask", "TASKS", "task_for", "default_task"]


# --------------------------------------------------------------------------------------------- model description


@dataclass
class ModelSpec:
    """Enough to rebuild a trained model: its task (``"det"`` / ``"cls"``), backbone, classes and the arguments
    it was built with. Saved in every checkpoint as the JSON ``state["model"]`` (:meth:`to_dict`)."""

    task: str
    backbone: str
    num_classes: int
    categories: list[str] = field(default_factory=list)
    label_to_category_id: dict[str, Any] | None = None
    detector: str | None = None  # detection: the detector's name ("retinanet")
    detector_kwargs: dict[str, Any] | None = None  # detection: its builder's arguments (head_convs, fpn_channels...)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    size: int | None = None  # the training input size
    mean: list[float] | None = None  # classification: the input normalisation
    std: list[float] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """From a checkpoint's ``state["model"]``; a top-level ``head_convs`` (checkpoints of earlier versions)
        moves into ``detector_kwargs``. Unknown keys are ignored."""
        d = dict(d)
        head_convs = d.pop("head_convs", None)
        names = {f.name for f in dataclasses.fields(cls)}
        spec = cls(**{k: v for k, v in d.items() if k in names})
        spec.backbone_kwargs = dict(spec.backbone_kwargs or {})
        if spec.detector_kwargs is not None:
            spec.detector_kwargs = dict(spec.detector_kwargs)
        if head_convs is not None:
            spec.detector_kwargs = {"head_convs": int(head_convs), **(spec.detector_kwargs or {})}
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def label_map(self) -> dict[int, Any]:
        """Label -> dataset category id (the label itself when unknown)."""
        return {int(k): v for k, v in (self.label_to_category_id or {}).items()}

    def describe(self) -> str:
        return task_for(self.task).describe(self)


# --------------------------------------------------------------------------------------------- tasks


class Task:
    """The interface of a task (see the module docstring)."""

    name: ClassVar[str]  # in configs and checkpoints
    primary_metric: ClassVar[str]  # the evaluation metric that picks the best checkpoint
    default_batch: ClassVar[int]

    @classmethod
    def from_config(cls, cfg=None) -> Task:
        """The task with the training options of ``cfg`` (a TrainConfig; None: the defaults)."""
        return cls()

    @staticmethod
    def accepts(source: DataSource) -> bool:
        raise NotImplementedError

    def check_source(self, source: DataSource) -> None:
        """Raise ValueError when ``source`` is not data for this task."""
        raise NotImplementedError

    def default_size(self, source: DataSource) -> int:
        raise NotImplementedError

    def describe(self, spec: ModelSpec) -> str:
        raise NotImplementedError

    def collate(self, batch):
        raise NotImplementedError


def _plain_target(t: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    return {"boxes": t["boxes"].as_subclass(Tensor).to(device, torch.float32),
            "labels": t["labels"].as_subclass(Tensor).to(device)}


def backbone_init(cfg) -> dict[str, Any]:
    """How the backbone starts, as ``config.json`` records it: ``mode`` "fine-tune" (published weights or a
    weights file: frozen BatchNorm, the first stages frozen, the weights' normalisation) or "from-scratch"
    (random init: live BatchNorm, every stage trained), the ``weights`` and the ``reason``; with published
    weights also their ``mean`` / ``std`` and the ``build_kwargs`` they need."""
    if cfg.pretrained is not None:
        from ..hub import get_weights

        w = get_weights(cfg.backbone, cfg.pretrained)
        return {"mode": "fine-tune", "weights": w.tag, "url": w.url, "mean": list(w.mean), "std": list(w.std),
                "build_kwargs": dict(w.build_kwargs),
                "reason": f"--pretrained: {cfg.backbone}'s published weights {w.tag}"
                          f"{' (its best)' if cfg.pretrained == 'default' else ''}"}
    if cfg.backbone_weights is not None:
        return {"mode": "fine-tune", "weights": str(cfg.backbone_weights), "reason": "--backbone-weights given"}
    from ..hub import has_weights

    hint = (f"; {cfg.backbone} has published weights: --pretrained fine-tunes them" if has_weights(cfg.backbone)
            else f"; {cfg.backbone} has no published weights")
    return {"mode": "from-scratch", "weights": None, "reason": "no --pretrained or --backbone-weights" + hint}


def default_detector_kwargs(size: int, pretrained: bool, n_stages: int | None = None) -> dict[str, Any]:
    """The engine's RetinaNet defaults at a training size: resize to ``size``; from random init train
    every stage with live BatchNorm (frozen BN is for pretrained backbones)."""
    kw: dict[str, Any] = {"min_size": int(size), "max_size": int(math.ceil(size * 1333 / 800))}
    if not pretrained:
        kw["frozen_bn"] = False
        if n_stages is not None:
            kw["trainable_stages"] = n_stages
    return kw


class DetectionTask(Task):
    """RetinaNet on a registered backbone; COCO box AP (and VOC mAP on VOC data)."""

    name = "det"
    primary_metric = "AP"
    default_batch = 8

    @staticmethod
    def accepts(source: DataSource) -> bool:
        return not source.is_classification

    def check_source(self, source: DataSource) -> None:
        if not self.accepts(source):
            raise ValueError("detection trains on --data, --coco or --voc (folders and CIFAR are for --task cls)")

    def default_size(self, source: DataSource) -> int:
        return 256

    def describe(self, spec: ModelSpec) -> str:
        return f"RetinaNet on {spec.backbone} with {spec.num_classes} classes"

    def collate(self, batch):
        from ..data import collate_detection

        return collate_detection(batch)

    # data and model ----------------------------------------------------------------------------------
    def datasets(self, cfg, size: int):
        """(train set, validation set or None, is_voc)."""
        return open_detection(cfg.source, size, augment=cfg.augment, skip_bad=cfg.skip_bad)

    def model_spec(self, cfg, train_set, size: int) -> ModelSpec:
        from ..registry import backbone_spec, create_backbone

        n_stages = None
        try:
            with torch.device("meta"):
                n_stages = len(create_backbone(cfg.backbone, features_only=True, **cfg.backbone_kwargs).stage_info)
        except Exception:  # noqa: BLE001 - the detector reports a bad backbone itself
            backbone_spec(cfg.backbone)
        init = backbone_init(cfg)
        det_kw = default_detector_kwargs(size, init["mode"] == "fine-tune", n_stages)
        if "mean" in init:  # recorded, so that the checkpoint rebuilds the same preprocessing without the weights
            det_kw.update(image_mean=init["mean"], image_std=init["std"])
        det_kw.update(cfg.detector_kwargs)
        self.anchor_fit = None
        if det_kw.pop("anchor_fit", False):
            det_kw.update(self.fit_anchors(train_set, det_kw, size))
        return ModelSpec(task=self.name, detector="retinanet", backbone=cfg.backbone,
                         num_classes=len(train_set.categories), categories=list(train_set.categories),
                         label_to_category_id={str(k): v for k, v in train_set.label_to_category_id.items()},
                         detector_kwargs=det_kw, backbone_kwargs={**init.get("build_kwargs", {}),
                                                                  **cfg.backbone_kwargs}, size=size)

    def fit_anchors(self, train_set, det_kw: dict[str, Any], size: int, limit: int = 300) -> dict[str, Any]:
        """``anchor_sizes`` and ``max_level`` fitted to the training boxes at the detector's input scale
        (:func:`~vertebra.detection.anchors.fit_anchors` on a seeded sample of ``limit`` images); what was chosen is
        kept in ``self.anchor_fit`` (config.json's ``anchors``)."""
        from ..detection.anchors import box_sample, fit_anchors

        min_size = det_kw.get("min_size", size)
        min_size = max(min_size) if isinstance(min_size, (list, tuple)) else min_size
        sample = box_sample(train_set.records, int(min_size), det_kw.get("max_size"), limit=limit)
        # the bottom level: as given, else P3, or P2 where small objects need it
        fit = fit_anchors(sample, min_level=int(det_kw["min_level"]) if "min_level" in det_kw else (2, 3))
        self.anchor_fit = {**fit.to_dict(), "describe": fit.describe()}
        return {"anchor_sizes": fit.anchor_sizes, "min_level": fit.min_level, "max_level": fit.max_level}

    def build_model(self, spec: ModelSpec, backbone_weights: str | None = None,
                    pretrained: str | None = None) -> nn.Module:
        from ..detection import create_detector

        kw = dict(spec.detector_kwargs or {})
        if spec.backbone_kwargs:
            kw["backbone_kwargs"] = dict(spec.backbone_kwargs)
        if backbone_weights is not None:
            kw["backbone_weights"] = backbone_weights
        if pretrained is not None:
            kw["backbone_pretrained"] = pretrained
        return create_detector(spec.detector or "retinanet", backbone=spec.backbone,
                               num_classes=int(spec.num_classes), **kw)

    # training and evaluation -------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch, *, device: torch.device, amp: str | None = None,
             size: int | None = None) -> tuple[Tensor, dict[str, Tensor], int]:
        """(total loss, its parts, images) of a batch: the detector's own training forward, with the network
        under ``amp`` (the detector keeps preprocessing, matching and the loss in float32) at input ``size``."""
        images, targets = batch
        images = [im.as_subclass(Tensor).to(device, non_blocking=True) for im in images]
        if all(im.shape == images[0].shape for im in images):
            images = torch.stack(images)
        targets = [_plain_target(t, device) for t in targets]
        with precision.autocast(device, amp), training_convs(device):
            losses = model(images, targets, size=size)
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}, len(targets)

    def evaluate(self, model: nn.Module, loader, dataset, *, device, amp: str | None = None, voc: bool = False,
                 distributed: bool = False, breakdown: bool = False) -> dict[str, float]:
        from .evaluate import evaluate_detector

        return evaluate_detector(model, loader, dataset, device, amp, voc=voc, distributed=distributed,
                                 breakdown=breakdown)

    def eval_dataset(self, spec: ModelSpec, source: DataSource, size: int, *, voc_split: str | None = None,
                     skip_bad: bool = False):
        """(the set ``vertebra eval`` measures, is_voc); its classes must be the checkpoint's."""
        ds, is_voc = open_detection_eval(source, size, categories=spec.categories, voc_split=voc_split,
                                         skip_bad=skip_bad)
        if list(ds.categories) != list(spec.categories):
            raise ValueError(f"the data's classes {ds.categories} differ from the checkpoint's {spec.categories}")
        return ds, is_voc

    @torch.no_grad()
    def predict(self, model: nn.Module, spec: ModelSpec, image: Tensor, *, device, score_thresh: float = 0.3
                ) -> dict[str, Any]:
        """``{"detections": [{"bbox_xyxy", "score", "label", "category", "category_id"}, ...]}`` of one image
        (3 x H x W, 0..1) above ``score_thresh``."""
        det = model([image.to(device)])[0]
        keep = det["scores"] >= score_thresh
        l2c = spec.label_map
        return {"detections": [
            {"bbox_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(lab),
             "category": spec.categories[int(lab)], "category_id": l2c.get(int(lab), int(lab))}
            for b, s, lab in zip(det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu())]}

    def render(self, image: Tensor, entry: dict[str, Any]):
        """The image with its detections drawn (a PIL image)."""
        from ..visualize import draw_detections

        return draw_detections(image, entry["detections"])

    def summary_line(self, entry: dict[str, Any]) -> str:
        return f"{len(entry['detections'])} detections -> {entry['output']}"


class ClassificationTask(Task):
    """A registered backbone as a classifier; top-1 / top-5 accuracy.

    ``label_smoothing`` (Rethinking the Inception Architecture, Sec. 7); ``aux_weight``, the weight of the
    auxiliary classifiers' losses (GoogLeNet's 0.3 by default; :meth:`from_config` takes the network's paper's,
    :func:`techniques.default_aux_weight`); ``channels_last`` input batches."""

    name = "cls"
    primary_metric = "top1"
    default_batch = 64

    def __init__(self, label_smoothing: float = 0.0, aux_weight: float = techniques.GOOGLENET_AUX_WEIGHT,
                 channels_last: bool = False):
        self.label_smoothing, self.aux_weight = float(label_smoothing), float(aux_weight)
        self.channels_last = bool(channels_last)

    @classmethod
    def from_config(cls, cfg=None) -> ClassificationTask:
        if cfg is None:
            return cls()
        aux = cfg.aux_weight
        if aux is None:
            from ..registry import backbone_spec

            aux = techniques.default_aux_weight(backbone_spec(cfg.backbone))
        return cls(cfg.label_smoothing, aux, cfg.channels_last)

    @staticmethod
    def accepts(source: DataSource) -> bool:
        return source.is_classification

    def check_source(self, source: DataSource) -> None:
        if source.kind is None:
            raise ValueError("classification needs --folder DIR or --cifar DIR")
        if not self.accepts(source):
            raise ValueError("classification trains on --folder DIR or --cifar DIR")

    def default_size(self, source: DataSource) -> int:
        return 32 if source.cifar else 224

    def describe(self, spec: ModelSpec) -> str:
        return f"classifier on {spec.backbone} with {spec.num_classes} classes"

    def collate(self, batch):
        from ..data import collate_classification

        return collate_classification(batch)

    # data and model ----------------------------------------------------------------------------------
    @staticmethod
    def normalization(backbone: str, pretrained: str | None = None) -> tuple[list[float], list[float]]:
        """The input mean / std of ``backbone``: its published weights' (``pretrained``), else its training
        set's (:attr:`BackboneSpec.mean`)."""
        if pretrained is not None:
            from ..hub import get_weights

            w = get_weights(backbone, pretrained)
            return list(w.mean), list(w.std)
        from ..registry import backbone_spec

        spec = backbone_spec(backbone)
        return list(spec.mean), list(spec.std)

    def datasets(self, cfg, size: int):
        mean, std = self.normalization(cfg.backbone, cfg.pretrained)
        train, val = open_classification(cfg.source, size, mean=mean, std=std, skip_bad=cfg.skip_bad)
        return train, val, False

    def model_spec(self, cfg, train_set, size: int) -> ModelSpec:
        mean, std = self.normalization(cfg.backbone, cfg.pretrained)
        init = backbone_init(cfg)
        return ModelSpec(task=self.name, backbone=cfg.backbone, num_classes=len(train_set.classes),
                         categories=list(train_set.classes),
                         backbone_kwargs={**init.get("build_kwargs", {}), **cfg.backbone_kwargs}, size=size,
                         mean=mean, std=std)

    def build_model(self, spec: ModelSpec, backbone_weights: str | None = None,
                    pretrained: str | None = None) -> nn.Module:
        from ..registry import create_backbone

        return create_backbone(spec.backbone, num_classes=int(spec.num_classes), weights=backbone_weights,
                               pretrained=pretrained, **dict(spec.backbone_kwargs or {}))

    # training and evaluation -------------------------------------------------------------------------
    def criterion(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.label_smoothing > 0:
            return techniques.label_smoothing_cross_entropy(logits, target, self.label_smoothing)
        return F.cross_entropy(logits.float(), target)

    def loss(self, model: nn.Module, batch, *, device: torch.device, amp: str | None = None,
             size: int | None = None) -> tuple[Tensor, dict[str, Tensor], int]:
        """(total loss, its parts, images): cross-entropy (label-smoothed), plus the auxiliary classifiers'
        losses weighted by ``aux_weight`` when the network returns them; the batch is resized to ``size``."""
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if size is not None:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(device, amp), training_convs(device):
            out = model(x)
        if isinstance(out, (tuple, list)):
            out = tuple(o.float() for o in out)
            total = techniques.aux_loss(out, y, self.aux_weight, self.criterion)
            return total, {"main": self.criterion(out[0].detach(), y)}, len(y)
        return self.criterion(out.float(), y), {}, len(y)

    def evaluate(self, model: nn.Module, loader, dataset, *, device, amp: str | None = None, voc: bool = False,
                 distributed: bool = False, breakdown: bool = False) -> dict[str, float]:
        from .evaluate import evaluate_classifier

        return evaluate_classifier(model, loader, device, amp, distributed=distributed)

    def eval_dataset(self, spec: ModelSpec, source: DataSource, size: int, *, voc_split: str | None = None,
                     skip_bad: bool = False):
        ds = open_classification_eval(source, size, mean=spec.mean, std=spec.std, categories=spec.categories,
                                      skip_bad=skip_bad)
        return ds, False

    @torch.no_grad()
    def predict(self, model: nn.Module, spec: ModelSpec, image: Tensor, *, device, score_thresh: float = 0.3
                ) -> dict[str, Any]:
        """``{"top5": [{"label", "category", "score"}, ...]}`` of one image (3 x H x W, 0..1)."""
        from ..data.transforms import classification_transforms

        t = classification_transforms(False, spec.size or 224, mean=spec.mean, std=spec.std)
        p = torch.softmax(model(t(image)[None].to(device)).float(), 1)[0]
        top = p.topk(min(5, p.numel()))
        return {"top5": [{"label": int(i), "category": spec.categories[int(i)], "score": round(float(s), 4)}
                         for s, i in zip(top.values, top.indices)]}

    def render(self, image: Tensor, entry: dict[str, Any]):
        return None

    def summary_line(self, entry: dict[str, Any]) -> str:
        best = entry["top5"][0]
        return f"{best['category']} ({best['score']:.3f})"


#: the tasks by the name configs and checkpoints store
TASKS: dict[str, type[Task]] = {DetectionTask.name: DetectionTask, ClassificationTask.name: ClassificationTask}


def task_for(name: str, cfg=None) -> Task:
    """The task named ``name`` (``"det"`` / ``"cls"``), with the training options of ``cfg`` (a TrainConfig)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(repr(t) for t in TASKS)}, got {name!r}")
    return TASKS[name].from_config(cfg)


def default_task(source: DataSource) -> str:
    """The name of the task that trains on ``source`` (classification for folders and CIFAR, else detection)."""
    return next(name for name, t in TASKS.items() if t.accepts(source))
