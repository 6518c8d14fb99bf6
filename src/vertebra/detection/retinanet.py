"""RetinaNet on any vertebra backbone.

Lin, Goyal, Girshick, He, Dollar, "Focal Loss for Dense Object Detection" (ICCV 2017,
arXiv 1708.02002). A backbone, an FPN with levels P3-P7 (``fpn.py``), 9 anchors per location
(``anchors.py``), and two heads shared across levels: a classification subnet (4 x [3x3 conv,
ReLU], then a 3x3 conv to K*A sigmoid outputs whose bias starts at -log((1 - pi) / pi), pi =
0.01) and a box subnet of the same shape ending in 4*A outputs. Training uses the focal loss
(alpha 0.25, gamma 2) over all non-ignored anchors, normalised by the number of foreground
anchors, and an L1 loss on the box codes of the foreground anchors (torchvision's choice; the
paper uses smooth L1). Inference keeps, per level, the top 1000 candidates scoring above 0.05,
decodes them and applies class-wise NMS at 0.5, keeping at most ``detections_per_img``.
``matcher="atss"`` replaces the fixed 0.5 / 0.4 IoU assignment by ATSS (Zhang et al., CVPR 2020,
1912.02424; see ``boxes.match_anchors_atss``).

The model is three modules: ``transform`` (``Preprocess``: normalise, resize, pad),
``net`` (``RetinaNetCore``: tensor in, ``(cls_logits [B, sum(HWA), K], bbox_regression
[B, sum(HWA), 4])`` out, what exports to ONNX / torch.export) and ``postprocess``
(``Postprocess``: decode, threshold, top-k, NMS, back to input pixels). Everything is batched
over images: matching pads the targets to a batch, postprocessing runs top-k and NMS on all
images at once (image index folded into the NMS class index).

With ``p6_from="p5"``, ``frozen_bn=True`` and a ResNet-50 it is torchvision's
``retinanet_resnet50_fpn`` (same anchors, head outputs, losses and detections after
``vertebra.load_reference_weights(model, sd, source="torchvision")``). With ``head_norm="gn"``,
``p6_from="c5"`` and ``box_loss="giou"`` it is ``retinanet_resnet50_fpn_v2`` (same layout, same
key map; the v2 backbone's BatchNorm is not frozen by torchvision).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import as_backbone
from .anchors import DEFAULT_ASPECT_RATIOS, AnchorGenerator, default_anchor_sizes
from .fpn import FPN
from .frozen import convert_frozen_bn, fold_frozen_bn_live, freeze_stages, num_stages
from .head import RetinaNetHead
from .losses import retinanet_losses
from .postprocess import Postprocess
from .transform import Preprocess, backbone_normalization

__all__ = ["RetinaNet", "RetinaNetCore", "RetinaNetHead", "Postprocess", "build_retinanet", "pretrained_retinanet",
           "detector_weights", "pyramid_strides", "validate_targets"]


def pyramid_strides(backbone, min_level: int = 3, max_level: int = 7) -> tuple[list[int], int]:
    """The backbone strides the FPN takes (finest first) and how many extra levels it adds: of every stage the
    backbone has (``stage_info``), those at 2**min_level ... 2**5 (P3-P5 at strides 8, 16, 32)."""
    strides = [f.stride for f in backbone.stage_info]
    need = 2**min_level
    if need not in strides:
        have = ", ".join(map(str, strides))
        reach = "cannot reach" if max(strides) < need else "has no stage at"
        raise ValueError(
            f"backbone {backbone.name} {reach} stride {need}, which P{min_level} of the FPN needs; its feature "
            f"strides are {have}" + (" (a CIFAR-style network keeps its resolution: use an ImageNet one)"
                                     if max(strides) < need else "")
        )
    taken = []
    lvl = min_level
    while lvl <= min(5, max_level) and 2**lvl in strides:
        taken.append(2**lvl)
        lvl += 1
    return taken, max_level - min_level + 1 - len(taken)


class RetinaNetCore(nn.Module):
    """Backbone + FPN + heads: ``forward(x) -> (cls_logits, bbox_regression)``; x normalised and padded.

    What exports to ONNX / torch.export. After :meth:`prepare_inference` it converts its input to the
    layout and dtype its weights were given.
    """

    def __init__(self, backbone, num_classes: int, num_anchors: int, fpn_channels: int = 256,
                 min_level: int = 3, max_level: int = 7, p6_from: str = "p5", head_norm: str | None = None,
                 head_convs: int = 4):
        super().__init__()
        taken, extra = pyramid_strides(backbone, min_level, max_level)
        backbone.configure_outputs(features_only=True, out_strides=taken)
        self.backbone = backbone
        self.levels = tuple(range(min_level, max_level + 1))
        self.backbone_strides = tuple(taken)
        in_ch = backbone.feature_info.channels()
        self.fpn = FPN(in_ch, fpn_channels, extra, p6_from)
        self.head = RetinaNetHead(fpn_channels, num_anchors, num_classes, num_convs=head_convs, norm=head_norm)
        self._input_format: torch.memory_format | None = None  # set by prepare_inference
        self._input_dtype: torch.dtype | None = None

    def prepare_inference(self, dtype: torch.dtype | None = None, channels_last: bool = True, *,
                          fold_bn: bool = True, fuse: bool = True) -> RetinaNetCore:
        """In place, for inference: BatchNorm (frozen too) folded, conv + ReLU fused (backbone and head
        towers), the weights in ``dtype`` and channels_last; the input is converted to match."""
        from ..layers.conv_bn import fold_bn_pairs
        from ..layers.fused import fuse_conv_act

        if fold_bn:
            fold_bn_pairs(self)
            if fuse:  # the backbone's, the FPN's and the head's convolutions (and the towers' ReLUs)
                fuse_conv_act(self)
        self._input_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self._input_format)
        if dtype is not None:
            self.to(dtype)
        self._input_dtype = dtype
        return self

    def pyramid(self, x: Tensor) -> list[Tensor]:
        if self._input_dtype is not None:
            x = x.to(self._input_dtype)
        if self._input_format is not None:
            x = x.contiguous(memory_format=self._input_format)
        return self.fpn(self.backbone.forward_levels(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.pyramid(x))


def _device_type(images) -> str:
    if isinstance(images, Tensor):
        return images.device.type
    first = next(iter(images), None)
    return first.device.type if isinstance(first, Tensor) else "cpu"


def _float32(device_type: str):
    """Autocast off: what runs inside computes in float32 whatever the caller's autocast."""
    return torch.autocast(device_type=device_type, enabled=False)


def _full(t: Tensor) -> Tensor:
    """A reduced-precision (autocast) output as float32; float32 / float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def validate_targets(targets, num_classes: int) -> None:
    """Raise ValueError unless ``targets`` is one ``{"boxes": N x 4 xyxy, "labels": N in [0, num_classes)}``
    per image with positive-size boxes."""
    if targets is None:
        raise ValueError("RetinaNet in train mode needs targets: one {'boxes', 'labels'} per image")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be an N x 4 tensor (xyxy), got "
                             f"{getattr(boxes, 'shape', type(boxes))}")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
            raise ValueError(f"targets[{i}]['labels'] must be a tensor of N = {boxes.shape[0]} class indices")
    if not targets:
        return
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    if boxes.numel():
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(1)
        out = (labels < 0) | (labels >= num_classes)
        flags = torch.stack((bad.any(), out.any())).tolist()
        if flags[0]:
            raise ValueError(f"all boxes need positive width and height (x1 < x2, y1 < y2); found "
                             f"{boxes[bad][0].tolist()}")
        if flags[1]:
            raise ValueError(f"labels must be in [0, {num_classes}), found {labels[out][0].item()}")


class RetinaNet(nn.Module):
    """The detector: ``model(images)`` in eval mode gives detections, ``model(images, targets)``
    in train mode the losses ``{"classification", "box_regression"}``.

    ``images``: a float tensor ``B x 3 x H x W`` or a list of ``3 x H x W`` in 0..1; targets: one
    ``{"boxes": N x 4 xyxy (input pixels), "labels": N int64 in [0, num_classes)}`` per image
    (N may be 0).

    ``categories``: the class names by label (the COCO names of a COCO-trained model, else None);
    ``pretrained_weights``: the published weights' entry (:class:`vertebra.hub.Weights`) it was loaded with.
    """

    categories: list[str] | None = None
    pretrained_weights = None

    def __init__(self, net: RetinaNetCore, anchor_generator: AnchorGenerator, transform: Preprocess,
                 postprocess: Postprocess, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, box_loss: str = "l1", name: str | None = None,
                 matcher: str = "iou", atss_topk: int = 9):
        super().__init__()
        if box_loss not in ("l1", "giou"):
            raise ValueError(f"box_loss must be 'l1' (torchvision v1) or 'giou' (v2), got {box_loss!r}")
        if matcher not in ("iou", "atss"):
            raise ValueError(f"matcher must be 'iou' (the paper's 0.5 / 0.4 IoU thresholds) or 'atss', got {matcher!r}")
        if int(atss_topk) < 1:
            raise ValueError(f"atss_topk must be >= 1, got {atss_topk}")
        self.box_loss = box_loss
        self.matcher, self.atss_topk = matcher, int(atss_topk)
        self.transform = transform
        self.net = net
        self.anchor_generator = anchor_generator
        self.postprocess = postprocess
        self.fg_iou_thresh, self.bg_iou_thresh = fg_iou_thresh, bg_iou_thresh
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.num_classes = net.head.num_classes
        self._name = name or f"retinanet_{net.backbone.name}_fpn"

    @property
    def name(self) -> str:
        return self._name

    @property
    def backbone(self):
        return self.net.backbone

    # -- pieces -----------------------------------------------------------------------
    def anchors_per_level(self, levels: Sequence[Tensor]) -> list[int]:
        """How many anchors each pyramid level has (the head's outputs are ordered level by level)."""
        a = self.anchor_generator.num_anchors_per_location()
        return [int(f.shape[-2]) * int(f.shape[-1]) * n for f, n in zip(levels, a)]

    def anchors_for(self, batch: Tensor, levels: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
        sizes = [tuple(f.shape[-2:]) for f in levels]
        anchors = self.anchor_generator(tuple(batch.shape[-2:]), sizes, dtype=torch.float32, device=batch.device)
        return anchors, self.anchors_per_level(levels)

    def compute_loss(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor,
                     anchors_per_level: Sequence[int], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The losses of head outputs against targets in the preprocessed batch's pixels."""
        return retinanet_losses(cls_logits, bbox_regression, anchors, anchors_per_level, targets,
                                matcher=self.matcher, fg_iou_thresh=self.fg_iou_thresh,
                                bg_iou_thresh=self.bg_iou_thresh, atss_topk=self.atss_topk,
                                focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma, box_loss=self.box_loss)

    # -- the contract -----------------------------------------------------------------
    def forward(self, images, targets: list[dict[str, Tensor]] | None = None, *, size: int | None = None):
        """Train mode: the losses ``{"classification", "box_regression"}``; eval mode: the detections.

        ``size`` replaces the preprocessing's ``min_size`` for this call (progressive resizing). Only the
        network (backbone, FPN, head) runs under a caller's ``torch.autocast``; preprocessing, anchors,
        matching, the losses and the postprocessing run in float32 with autocast disabled.
        """
        if self.training:
            validate_targets(targets, self.num_classes)
        with _float32(_device_type(images)):
            batch, targets = self.transform(images, targets if self.training else None, size=size)
        levels = self.net.pyramid(batch.tensor)
        cls_logits, bbox_regression = self.net.head(levels)
        with _float32(batch.tensor.device.type):
            cls_logits, bbox_regression = _full(cls_logits), _full(bbox_regression)
            anchors, per_level = self.anchors_for(batch.tensor, levels)
            if self.training:
                return self.compute_loss(cls_logits, bbox_regression, anchors, per_level, targets)
            return self.postprocess(cls_logits, bbox_regression, anchors, per_level, batch.image_sizes,
                                    batch.original_sizes)

    # -- inference --------------------------------------------------------------------
    def prepare_inference(self, dtype: torch.dtype | None = None, channels_last: bool = True, *,
                          fold_bn: bool = True, fuse: bool = True) -> RetinaNet:
        """In place, for inference: the network folded, fused, channels_last and in ``dtype``
        (:meth:`RetinaNetCore.prepare_inference`); preprocessing, anchors and postprocessing stay
        float32. Irreversible (the state_dict loses the BN keys). Returns self."""
        self.eval()
        self.net.prepare_inference(dtype, channels_last, fold_bn=fold_bn, fuse=fuse)
        return self


def build_retinanet(backbone: str | nn.Module = "resnet50", num_classes: int = 91, *, min_size=800,
                    max_size: int = 1333, image_mean=None, image_std=None, score_thresh: float = 0.05,
                    nms_thresh: float = 0.5, detections_per_img: int = 300, topk_candidates: int = 1000,
                    anchor_sizes=None, aspect_ratios=None, trainable_stages: int = 3, frozen_bn: bool = True,
                    backbone_weights=None, backbone_pretrained=None, head_norm: str | None = None,
                    fpn_channels: int = 256,
                    p6_from: str = "p5", min_level: int = 3, max_level: int = 7, fg_iou_thresh: float = 0.5,
                    bg_iou_thresh: float = 0.4, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                    box_loss: str = "l1", size_divisible: int = 32, backbone_kwargs: dict | None = None,
                    matcher: str = "iou", atss_topk: int = 9, head_convs: int = 4,
                    feature_strides: Sequence[int] | None = None) -> RetinaNet:
    """A RetinaNet on a registered backbone (by name), a vertebra Backbone instance, or any module that returns
    feature levels: a timm ``features_only`` model, a torchvision ``create_feature_extractor`` model.

    A module that is not a vertebra Backbone is wrapped in :class:`~vertebra.detection.adapter.BackboneAdapter`:
    its levels' channels and strides come from ``feature_strides`` (the stride of each level it returns, in its
    order) if given, else from timm's ``feature_info`` (``channels()`` / ``reduction()``), else from one forward
    pass of a zero image at construction. The FPN takes the levels at strides 8, 16, 32 (P3-P5; ``min_level``)
    and adds the rest; ``trainable_stages`` counts the levels the module returns (the parameters before the
    first belong to it); ``frozen_bn`` converts every BatchNorm2d of the module (timm's BatchNormAct2d to its
    frozen twin); the normalisation defaults to timm's ``pretrained_cfg`` mean / std, else ImageNet's.

    ``image_mean`` / ``image_std`` default to the backbone's normalisation: that of the weights it was loaded
    with, else its network's (``detection.transform.backbone_normalization``; ImageNet's for an instance that
    says nothing). COCO-trained weights: :func:`pretrained_retinanet`.
    """
    if not 2 <= min_level <= max_level:
        raise ValueError(f"need 2 <= min_level <= max_level, got {min_level}, {max_level}")
    if isinstance(backbone, str):
        from ..registry import create_backbone

        bb = create_backbone(backbone, features_only=True, weights=backbone_weights, pretrained=backbone_pretrained,
                             **(backbone_kwargs or {}))
    else:
        if backbone_weights is not None or backbone_pretrained is not None:
            raise ValueError("backbone_weights goes with a backbone name; load weights into an instance yourself")
        bb = as_backbone(backbone, **({} if feature_strides is None else {"strides": feature_strides}))
    levels = list(range(min_level, max_level + 1))
    if anchor_sizes is None:
        anchor_sizes = default_anchor_sizes(levels)
    if len(anchor_sizes) != len(levels):
        raise ValueError(f"anchor_sizes gives {len(anchor_sizes)} levels, the pyramid has {len(levels)} "
                         f"(P{min_level}-P{max_level})")
    anchor_gen = AnchorGenerator(anchor_sizes, aspect_ratios or DEFAULT_ASPECT_RATIOS)
    num_anchors = anchor_gen.num_anchors_per_location()
    if len(set(num_anchors)) != 1:
        raise ValueError(f"the shared head needs the same number of anchors on every level, got {num_anchors}")
    net = RetinaNetCore(bb, num_classes, num_anchors[0], fpn_channels, min_level, max_level, p6_from, head_norm,
                         head_convs)
    if frozen_bn:
        convert_frozen_bn(net.backbone)
        fold_frozen_bn_live(net.backbone)
    freeze_stages(net.backbone, min(trainable_stages, num_stages(net.backbone)))
    if image_mean is None or image_std is None:
        mean, std = backbone_normalization(bb)
        image_mean = mean if image_mean is None else image_mean
        image_std = std if image_std is None else image_std
    transform = Preprocess(min_size, max_size, image_mean, image_std, size_divisible)
    post = Postprocess(score_thresh, nms_thresh, detections_per_img, topk_candidates)
    return RetinaNet(net, anchor_gen, transform, post, fg_iou_thresh, bg_iou_thresh, focal_alpha, focal_gamma,
                     box_loss, matcher=matcher, atss_topk=atss_topk)


# -- published detector weights ------------------------------------------------------------

#: a RetinaNet weights entry's network name: ``retinanet_<backbone>_fpn`` or ``retinanet_<backbone>_fpn_v2``
_WEIGHTS_NETWORK = re.compile(r"^retinanet_(?P<backbone>.+)_fpn(?:_v\d+)?$")


def _retinanet_rows() -> list[tuple[str, Any]]:
    """(backbone, entry) of every RetinaNet entry of the weights table."""
    from ..hub import list_weights

    rows = []
    for w in list_weights():
        m = _WEIGHTS_NETWORK.match(w.network)
        if m:
            rows.append((str(w.build_kwargs.get("backbone", m["backbone"])), w))
    return rows


def _box_ap(w) -> float:
    return float(w.metrics.get("box_ap") or 0.0)


def _listing(rows) -> str:
    if not rows:
        return "the weights table has no RetinaNet weights"
    return "; ".join(f"{w.network}:{w.name} (backbone {bb}, {w.num_classes} {w.categories} classes, box AP "
                     f"{_box_ap(w):g})" for bb, w in rows)


def detector_weights(backbone: str = "resnet50", pretrained: bool | str = "coco"):
    """The published RetinaNet weights (a :class:`vertebra.hub.Weights` entry) that ``pretrained`` names.

    - ``"coco"`` (or ``True``): of the COCO-trained sets for ``backbone``, the one with the highest box AP its
      source reports (for resnet50 that is torchvision's ``retinanet_resnet50_fpn_v2``);
    - ``"<network>"``: that detector network's default set, e.g. ``"retinanet_resnet50_fpn"`` (torchvision's v1);
    - ``"<network>:<tag>"``: one set, e.g. ``"retinanet_resnet50_fpn:COCO_V1"`` or
      ``"retinanet_resnet50_fpn_v2:torchvision:COCO_V1"``.

    A backbone without such weights, or a name that is none of these, raises :class:`vertebra.hub.WeightsError`
    listing the RetinaNet weights that exist.
    """
    from ..hub import WeightsError, get_weights

    rows = _retinanet_rows()
    key = "coco" if pretrained is True else pretrained
    if not isinstance(key, str) or not key:
        raise TypeError(f"pretrained must be True, 'coco' or a name such as 'retinanet_resnet50_fpn:COCO_V1', "
                        f"got {pretrained!r}")
    if key in {"coco"} | {w.categories for _, w in rows}:
        mine = [(bb, w) for bb, w in rows if bb == backbone and w.categories == key]
        if not mine:
            raise WeightsError(f"no {key.upper()}-trained RetinaNet weights for the backbone {backbone!r}; "
                               f"there are: {_listing(rows)}")
        return max(mine, key=lambda r: (_box_ap(r[1]), r[1].default))[1]
    network, _, tag = key.partition(":")
    found = [(bb, w) for bb, w in rows if w.network == network]
    if not found:
        raise WeightsError(f"pretrained={pretrained!r}: 'coco' or a RetinaNet weights name is expected; there "
                           f"are: {_listing(rows)}")
    bb, w = found[0]
    if bb != backbone:
        raise WeightsError(f"{network}'s weights are for the backbone {bb!r}, not {backbone!r}")
    return get_weights(network, tag or True)


def pretrained_retinanet(backbone: str = "resnet50", pretrained: bool | str = "coco", num_classes: int | None = None,
                         **kwargs) -> RetinaNet:
    """A RetinaNet with published detector weights (``pretrained`` as :func:`detector_weights` reads it).

    Built with the settings its source trains and evaluates those weights with: build_retinanet's defaults are
    torchvision's (``min_size=800, max_size=1333, score_thresh=0.05, nms_thresh=0.5, detections_per_img=300,
    topk_candidates=1000``), the entry's ``build_kwargs`` give its layout (the v2: GroupNorm head, P6 from C5,
    GIoU loss) and its mean / std the normalisation; ``kwargs`` override any of them (a layout override that
    does not fit the weights fails in the load). The file is downloaded into the cache, its checksum checked and
    read without unpickling (:func:`vertebra.hub.load_state_dict`), then loaded through the torchvision key map.
    ``model.categories`` holds the class names by label (torchvision's 91 COCO entries, ``"N/A"`` and
    ``"__background__"`` included, so a label is the COCO category id), ``model.pretrained_weights`` the entry.
    ``num_classes`` other than the weights' is an error (no COCO weights exist for it).
    """
    from .. import hub
    from ..weights import load_reference_weights

    if not isinstance(backbone, str):
        raise ValueError("pretrained detector weights go with a backbone name, not a Backbone instance")
    if kwargs.get("backbone_weights") is not None:
        raise ValueError("give either pretrained (the whole detector's weights) or backbone_weights, not both")
    w = detector_weights(backbone, pretrained)
    if num_classes is not None and int(num_classes) != w.num_classes:
        raise hub.WeightsError(f"{w.network}:{w.name} has {w.num_classes} classes, not {num_classes}; the "
                               f"RetinaNet weights that exist: {_listing(_retinanet_rows())}")
    args = {k: v for k, v in w.build_kwargs.items() if k != "backbone"}
    args.update(image_mean=list(w.mean), image_std=list(w.std))
    args.update(kwargs)
    model = build_retinanet(backbone, w.num_classes, **args)
    load_reference_weights(model, hub.load_state_dict(w), w.source)
    model.categories = hub.category_names(w)
    model.pretrained_weights = w
    return model
