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
``net`` (``RetinaNetNet``: tensor in, ``(cls_logits [B, sum(HWA), K], bbox_regression
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

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, generalized_box_iou_loss

from .anchors import DEFAULT_ASPECT_RATIOS, AnchorGenerator, default_anchor_sizes
from .boxes import (
    BETWEEN_THRESHOLDS,
    decode_boxes,
    encode_boxes,
    focal_loss_dense,
    match_anchors,
    match_anchors_atss,
    pad_targets,
)
from .fpn import FPN
from .frozen import convert_frozen_bn, fold_frozen_bn, fold_frozen_bn_live, freeze_stages
from .transform import ImageBatch, Preprocess

__all__ = ["RetinaNet", "RetinaNetNet", "RetinaNetHead", "Postprocess", "build_retinanet", "pyramid_strides",
           "validate_targets"]


def _tower(channels: int, num_convs: int, norm: str | None) -> nn.Sequential:
    blocks = []
    for _ in range(num_convs):
        layers = [nn.Conv2d(channels, channels, 3, padding=1, bias=norm is None)]
        if norm == "gn":
            layers.append(nn.GroupNorm(32, channels))
        layers.append(nn.ReLU(inplace=True))
        blocks.append(nn.Sequential(*layers))
    return nn.Sequential(*blocks)


class RetinaNetHead(nn.Module):
    """The classification and box subnets, shared across pyramid levels.

    ``forward(levels)`` returns ``cls_logits [B, sum(H*W*A), K]`` and ``bbox_regression
    [B, sum(H*W*A), 4]``, ordered level by level, then row-major cells, then anchors (torchvision's
    order). Levels have different sizes, so each runs through the towers in turn (5 calls, no
    loop over images or classes); the outputs are concatenated.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 prior_probability: float = 0.01, norm: str | None = None):
        super().__init__()
        if norm not in (None, "gn"):
            raise ValueError(f"head_norm must be None or 'gn', got {norm!r}")
        self.num_classes, self.num_anchors, self.norm = num_classes, num_anchors, norm
        self.cls_tower = _tower(in_channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.box_tower = _tower(in_channels, num_convs, norm)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def fuse_for_inference(self) -> None:
        """Inference only (called by ``vertebra.optimize_for_inference``): every tower conv + ReLU runs as
        one oneDNN call on CPU (``layers.fused.FusedConv``; plain ops elsewhere). The parameter names stay
        the same; towers with GroupNorm are left as they are."""
        from ..layers.fused import FusedConv

        if self.norm is not None:
            return
        for tower in (self.cls_tower, self.box_tower):
            for block in tower:
                if type(block[0]) is nn.Conv2d and len(block) == 2 and isinstance(block[1], nn.ReLU):
                    block[0] = FusedConv(block[0], relu=True)
                    block[1] = nn.Identity()

    def forward(self, levels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        k = self.num_classes
        cls_out, box_out = [], []
        for f in levels:
            b = f.shape[0]
            # [B, A*K, H, W] -> [B, H, W, A*K] -> [B, H*W*A, K]: a view when channels_last
            cls_out.append(self.cls_logits(self.cls_tower(f)).permute(0, 2, 3, 1).reshape(b, -1, k))
            box_out.append(self.bbox_pred(self.box_tower(f)).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return torch.cat(cls_out, dim=1), torch.cat(box_out, dim=1)

    def forward_cls(self, levels: Sequence[Tensor]) -> Tensor:
        k = self.num_classes
        return torch.cat([self.cls_logits(self.cls_tower(f)).permute(0, 2, 3, 1).reshape(f.shape[0], -1, k)
                          for f in levels], dim=1)

    def locate(self, sizes: Sequence[tuple[int, int]], ni: Tensor) -> tuple[Tensor, Tensor]:
        """The pyramid level of each index ``ni`` of the concatenated outputs and its index within that
        level (cell * A + anchor); ``sizes``: the levels' (H, W)."""
        counts = torch.tensor([h * w * self.num_anchors for h, w in sizes], device=ni.device)
        ends = counts.cumsum(0)
        lvl = torch.bucketize(ni, ends, right=True)
        return lvl, ni - (ends - counts)[lvl]

    def box_at(self, levels: Sequence[Tensor], bi: Tensor, ni: Tensor) -> Tensor:
        """``bbox_regression[bi, ni]`` computed only where it is needed (training: foreground anchors).

        The box subnet output of a cell depends on the (2R+1)^2 neighbourhood of the cell in the
        pyramid level, R = number of 3x3 convolutions; so every distinct cell runs the subnet on
        its own patch with unpadded convolutions, the positions outside the map zeroed after every
        layer (where the dense subnet's zero padding is). The same function and gradients as the
        dense subnet, at a few hundred cells instead of every cell of every level. Not for
        ``head_norm="gn"`` (GroupNorm's statistics span the whole map).
        """
        a_n = self.num_anchors
        r = len(self.box_tower) + 1
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in levels]
        lvl, rel = self.locate(sizes, ni)
        cell, anchor = torch.div(rel, a_n, rounding_mode="floor"), rel % a_n
        out = levels[0].new_zeros(ni.shape[0], 4) + 0.0 * self.bbox_pred.bias.sum()  # in the graph even if empty
        span = torch.arange(2 * r + 1, device=ni.device)
        for level, (f, (h, w)) in enumerate(zip(levels, sizes)):
            sel = (lvl == level).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            uniq, inv = torch.unique(bi[sel] * (h * w) + cell[sel], return_inverse=True)
            ub, uc = torch.div(uniq, h * w, rounding_mode="floor"), uniq % (h * w)
            ys = torch.div(uc, w, rounding_mode="floor")[:, None] + span  # rows in the padded map
            xs = (uc % w)[:, None] + span
            padded = F.pad(f, (r, r, r, r))
            t = padded[ub[:, None, None], :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)  # [U, C, P, P]
            inside = (((ys >= r) & (ys < h + r))[:, :, None] & ((xs >= r) & (xs < w + r))[:, None, :])
            inside = inside[:, None].to(t.dtype)
            for i, block in enumerate(self.box_tower):
                conv = block[0]
                t = F.conv2d(t, conv.weight, conv.bias)
                if getattr(conv, "relu", False):  # a FusedConv (optimize_for_inference) carries its ReLU
                    t = F.relu(t)
                for m in list(block)[1:]:
                    t = m(t)
                k = i + 1
                t = t * inside[:, :, k:-k, k:-k]
            t = F.conv2d(t, self.bbox_pred.weight, self.bbox_pred.bias).reshape(-1, a_n, 4)
            out = out.index_put((sel,), t[inv, anchor[sel]])
        return out


def pyramid_strides(backbone, min_level: int = 3, max_level: int = 7) -> tuple[list[int], int]:
    """The backbone strides the FPN takes (finest first) and how many extra levels it adds."""
    strides = [f.stride for f in backbone.feature_info]
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


class RetinaNetNet(nn.Module):
    """Backbone + FPN + heads: ``forward(x) -> (cls_logits, bbox_regression)``; x normalised and padded."""

    def __init__(self, backbone, num_classes: int, num_anchors: int, fpn_channels: int = 256,
                 min_level: int = 3, max_level: int = 7, p6_from: str = "p5", head_norm: str | None = None,
                 head_convs: int = 4):
        super().__init__()
        taken, extra = pyramid_strides(backbone, min_level, max_level)
        backbone.configure_outputs(features_only=True, out_strides=taken)
        self.backbone = backbone
        self.levels = tuple(range(min_level, max_level + 1))
        self.backbone_strides = tuple(taken)
        in_ch = [f.channels for f in backbone.out_feature_info]
        self.fpn = FPN(in_ch, fpn_channels, extra, p6_from)
        self.head = RetinaNetHead(fpn_channels, num_anchors, num_classes, num_convs=head_convs, norm=head_norm)
        self.channels_last = False
        #: the dtype the network computes in (None: the input's); ``optimize_for_inference(dtype=)`` sets it
        self.compute_dtype: torch.dtype | None = None

    def pyramid(self, x: Tensor) -> list[Tensor]:
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fpn(self.backbone.forward_features(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.pyramid(x))


class Postprocess(nn.Module):
    """Detections from head outputs, batched over images.

    Per level and image: the ``topk_candidates`` best (anchor, class) scores above
    ``score_thresh``, decoded and clipped to the image; then class-wise NMS over all images at
    once (``batched_nms`` with index ``image * K + class``) and the ``detections_per_img`` best
    per image; boxes scaled back to the input image.

    ``bbox_regression`` is the ``[B, N, 4]`` tensor, or a function ``(image_idx, anchor_idx) ->
    [C, 4]`` that computes the regression of the candidates only.

    The candidates are found in one pass over all logits of the batch (a comparison with the
    threshold's logit, so the sigmoid is only taken of the candidates); the top-k per (image,
    level) is a rank within its group, needed only when a group has more than k candidates.
    """

    def __init__(self, score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 300,
                 topk_candidates: int = 1000):
        super().__init__()
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.topk_candidates = int(topk_candidates)

    def _logit_thresh(self) -> float:
        t = self.score_thresh
        if t <= 0:
            return -math.inf
        if t >= 1:
            return math.inf
        x = math.log(t / (1 - t))
        return x - 1e-3 * max(1.0, abs(x))  # a margin: the exact test is on the sigmoid below

    def candidates(self, cls_logits: Tensor, bbox_regression, anchors: Tensor,
                   anchors_per_level: Sequence[int], image_sizes: Tensor) -> tuple[Tensor, ...]:
        """Candidates of the whole batch: boxes [C, 4], scores [C], labels [C], image index [C]."""
        b, n, k = cls_logits.shape
        th = self._logit_thresh()
        # the anchors with any class above the threshold first (a max over the classes reads the logits once;
        # nonzero over all B x N x K would cost 3x that), then their classes: the same (image, anchor, class)
        # order as a nonzero over the whole tensor
        ba, ai = (cls_logits.amax(-1) > th).nonzero(as_tuple=True)
        rows = cls_logits[ba, ai]
        mi, ci = (rows > th).nonzero(as_tuple=True)
        bi, j = ba[mi], ai[mi] * k + ci
        logits = rows[mi, ci].float()  # a bf16 network (optimize_for_inference(dtype=...)): float from here on
        scores = torch.sigmoid(logits)
        ok = scores > self.score_thresh
        if not bool(ok.all()):
            bi, j, scores = bi[ok], j[ok], scores[ok]
        anchor_idx = torch.div(j, k, rounding_mode="floor")
        labels = j - anchor_idx * k
        ends = torch.tensor(list(anchors_per_level), device=j.device).cumsum(0)
        level = torch.bucketize(anchor_idx, ends, right=True)
        group = bi * len(anchors_per_level) + level
        counts = torch.bincount(group, minlength=b * len(anchors_per_level))
        if counts.numel() and int(counts.max()) > self.topk_candidates:
            # top-k of every (image, level) group: rank within the group by descending score
            by_score = torch.sort(scores, descending=True, stable=True).indices
            g_sorted, by_group = torch.sort(group[by_score], stable=True)
            order = by_score[by_group]
            first = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=order.device) - first[g_sorted]
            sel = order[rank < self.topk_candidates]
            bi, anchor_idx, labels, scores = bi[sel], anchor_idx[sel], labels[sel], scores[sel]
        reg = bbox_regression(bi, anchor_idx) if callable(bbox_regression) else bbox_regression[bi, anchor_idx]
        boxes = decode_boxes(reg.float(), anchors[anchor_idx])
        # clip to the (resized) image: x to [0, w], y to [0, h]
        hw = image_sizes.to(boxes.dtype)[bi]
        upper = torch.stack((hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]), dim=1)
        boxes = torch.minimum(boxes.clamp(min=0), upper)
        return boxes, scores, labels, bi

    def forward(self, cls_logits: Tensor, bbox_regression, anchors: Tensor, anchors_per_level: Sequence[int],
                image_sizes: Sequence[tuple[int, int]], original_sizes: Sequence[tuple[int, int]] | None = None
                ) -> list[dict[str, Tensor]]:
        b, _, k = cls_logits.shape
        dev = cls_logits.device
        sizes = torch.tensor(image_sizes, device=dev)
        boxes, scores, labels, img = self.candidates(cls_logits, bbox_regression, anchors, anchors_per_level, sizes)
        order = batched_nms(boxes, scores, img * k + labels, self.nms_thresh)  # by score, descending
        # the best detections_per_img of every image: a stable sort by image keeps the score order
        img_sorted, perm = torch.sort(img[order], stable=True)
        order = order[perm]
        counts = torch.bincount(img_sorted, minlength=b)
        if counts.numel() and int(counts.max()) > self.detections_per_img:
            first = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=dev) - first[img_sorted]
            sel = rank < self.detections_per_img
            order, img_sorted = order[sel], img_sorted[sel]
            counts = counts.clamp(max=self.detections_per_img)
        boxes, scores, labels = boxes[order], scores[order], labels[order]
        if original_sizes is not None:
            orig = torch.tensor(original_sizes, dtype=torch.float32, device=dev)
            ratio = orig / sizes.to(torch.float32)  # [B, 2]: (h, w)
            r = torch.stack((ratio[:, 1], ratio[:, 0], ratio[:, 1], ratio[:, 0]), dim=1)
            boxes = boxes * r[img_sorted]
        per_image = counts.tolist()
        return [{"boxes": bx, "scores": sc, "labels": lb}
                for bx, sc, lb in zip(boxes.split(per_image), scores.split(per_image), labels.split(per_image))]


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
    """

    def __init__(self, net: RetinaNetNet, anchor_generator: AnchorGenerator, transform: Preprocess,
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
        #: training runs the box subnet only on the foreground cells, inference on the cells of the
        #: candidates when they are few (exact either way; see RetinaNetHead.box_at)
        self.sparse_box_head = True
        self._name = name or f"retinanet_{net.backbone.name}_fpn"
        self.fused = False

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

    def compute_loss(self, cls_logits: Tensor, bbox_regression: Tensor | None, anchors: Tensor,
                     targets: list[dict[str, Tensor]], levels: Sequence[Tensor] | None = None,
                     anchors_per_level: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The losses; with ``bbox_regression=None`` the box subnet runs on the foreground cells of ``levels``.

        ``anchors_per_level`` (from :meth:`anchors_for`) is needed by the ATSS matcher; without it the
        levels' sizes are taken from ``levels``."""
        b = cls_logits.shape[0]
        gt_boxes, gt_labels, valid = pad_targets(targets, device=cls_logits.device)
        if self.matcher == "atss":
            if anchors_per_level is None:
                if levels is None:
                    raise ValueError("the ATSS matcher needs anchors_per_level (or levels)")
                anchors_per_level = self.anchors_per_level(levels)
            matches = match_anchors_atss(gt_boxes, valid, anchors, list(anchors_per_level), self.atss_topk)
        else:
            matches = match_anchors(gt_boxes, valid, anchors, self.fg_iou_thresh, self.bg_iou_thresh)
        fg = matches >= 0
        norm = 1.0 / (fg.sum(1).clamp(min=1).to(cls_logits.dtype) * b)  # per image: 1 / (num_fg * B)
        anchor_w = (matches != BETWEEN_THRESHOLDS).to(cls_logits.dtype) * norm[:, None]
        bi, ni = fg.nonzero(as_tuple=True)
        gi = matches[bi, ni]
        ki = gt_labels[bi, gi]
        pos_w = norm[bi]
        cls_loss = focal_loss_dense(cls_logits, anchor_w, (bi, ni, ki), pos_w, self.focal_alpha, self.focal_gamma)
        reg = bbox_regression[bi, ni] if bbox_regression is not None else self.net.head.box_at(levels, bi, ni)
        if self.box_loss == "giou":
            pred = decode_boxes(reg, anchors[ni])
            per_anchor = generalized_box_iou_loss(pred, gt_boxes[bi, gi], reduction="none", eps=1e-7)
        else:
            per_anchor = (reg - encode_boxes(gt_boxes[bi, gi], anchors[ni])).abs().sum(-1)
        box_loss = (per_anchor * pos_w).sum()
        return {"classification": cls_loss, "box_regression": box_loss}

    def _check_targets(self, targets) -> None:  # the engine's old call; goes once engine/ calls forward
        validate_targets(targets, self.num_classes)

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
        dev = batch.tensor.device.type
        sparse = self.sparse_box_head and self.net.head.norm is None and not torch.is_autocast_enabled(dev)
        if sparse:
            cls_logits = self.net.head.forward_cls(levels)
            bbox_regression = None
        else:
            cls_logits, bbox_regression = self.net.head(levels)
        with _float32(dev):
            anchors, per_level = self.anchors_for(batch.tensor, levels)
            if self.training:
                if sparse:
                    return self.compute_loss(_full(cls_logits), None, anchors, targets, levels, per_level)
                return self.compute_loss(_full(cls_logits), _full(bbox_regression), anchors, targets,
                                         anchors_per_level=per_level)
            if sparse:
                return self.postprocess(cls_logits, self._box_regression_of(levels), anchors, per_level,
                                        batch.image_sizes, batch.original_sizes)
            return self.postprocess(cls_logits, bbox_regression, anchors, per_level, batch.image_sizes,
                                    batch.original_sizes)

    def _box_regression_of(self, levels: Sequence[Tensor]):
        """The box regression of the postprocessing candidates, level by level: the box subnet on the
        candidates' cells only where that is cheaper than the dense subnet on the level (a cell's patch
        costs about ``sum((2i + 1)^2, i = 1..R-1) / R`` cells of the dense subnet, R its 3x3 convs: 33 for
        the 4-conv tower)."""
        head = self.net.head
        a_n = head.num_anchors
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in levels]
        r = len(head.box_tower) + 1  # 3x3 convs of the subnet, its output conv included
        patch_cost = sum((2 * i + 1) ** 2 for i in range(1, r)) / r

        def regression(bi: Tensor, ni: Tensor) -> Tensor:
            lvl, rel = head.locate(sizes, ni)
            out = levels[0].new_zeros(ni.shape[0], 4)
            for level, (f, (h, w)) in enumerate(zip(levels, sizes)):
                sel = (lvl == level).nonzero(as_tuple=True)[0]
                if sel.numel() == 0:
                    continue
                cells = torch.unique(bi[sel] * (h * w) + torch.div(rel[sel], a_n, rounding_mode="floor")).numel()
                if cells * patch_cost < f.shape[0] * h * w:
                    out[sel] = head.box_at(levels, bi[sel], ni[sel])
                else:
                    dense = head.bbox_pred(head.box_tower(f)).permute(0, 2, 3, 1).reshape(f.shape[0], -1, 4)
                    out[sel] = dense[bi[sel], rel[sel]]
            return out

        return regression

    def detect(self, batch: ImageBatch) -> list[dict[str, Tensor]]:
        """Detections of an already preprocessed batch (boxes in the batch's resized pixels)."""
        levels = self.net.pyramid(batch.tensor)
        cls_logits, bbox_regression = self.net.head(levels)
        anchors, per_level = self.anchors_for(batch.tensor, levels)
        return self.postprocess(cls_logits, bbox_regression, anchors, per_level, batch.image_sizes)

    # -- inference speed-ups ----------------------------------------------------------
    def fuse(self) -> RetinaNet:
        """For inference: fold the frozen (or eval-mode) BatchNorms into their convolutions.

        Irreversible; the state_dict loses the BN keys. Call it on a model that will not be trained.
        """
        fold_frozen_bn(self.net.backbone)
        self.fused = True
        return self

    def channels_last(self, enabled: bool = True) -> RetinaNet:
        """Run the network in channels_last memory format (faster convolutions on CPU and GPU)."""
        self.net.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.net.channels_last = enabled
        return self


def build_retinanet(backbone: str | nn.Module = "resnet50", num_classes: int = 91, *, min_size=800,
                    max_size: int = 1333, image_mean=None, image_std=None, score_thresh: float = 0.05,
                    nms_thresh: float = 0.5, detections_per_img: int = 300, topk_candidates: int = 1000,
                    anchor_sizes=None, aspect_ratios=None, trainable_stages: int = 3, frozen_bn: bool = True,
                    backbone_weights=None, head_norm: str | None = None, fpn_channels: int = 256,
                    p6_from: str = "p5", min_level: int = 3, max_level: int = 7, fg_iou_thresh: float = 0.5,
                    bg_iou_thresh: float = 0.4, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                    box_loss: str = "l1", size_divisible: int = 32, backbone_kwargs: dict | None = None,
                    matcher: str = "iou", atss_topk: int = 9, head_convs: int = 4) -> RetinaNet:
    """A RetinaNet on a registered backbone (by name) or on a vertebra Backbone instance."""
    if not 2 <= min_level <= max_level:
        raise ValueError(f"need 2 <= min_level <= max_level, got {min_level}, {max_level}")
    if isinstance(backbone, str):
        from ..registry import create_backbone

        bb = create_backbone(backbone, features_only=True, weights=backbone_weights, **(backbone_kwargs or {}))
    else:
        if backbone_weights is not None:
            raise ValueError("backbone_weights goes with a backbone name; load weights into an instance yourself")
        bb = backbone
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
    net = RetinaNetNet(bb, num_classes, num_anchors[0], fpn_channels, min_level, max_level, p6_from, head_norm,
                       head_convs)
    if frozen_bn:
        convert_frozen_bn(net.backbone)
        fold_frozen_bn_live(net.backbone)
    freeze_stages(net.backbone, min(trainable_stages, len(net.backbone.feature_info)))
    transform = Preprocess(min_size, max_size, image_mean, image_std, size_divisible)
    post = Postprocess(score_thresh, nms_thresh, detections_per_img, topk_candidates)
    return RetinaNet(net, anchor_gen, transform, post, fg_iou_thresh, bg_iou_thresh, focal_alpha, focal_gamma,
                     box_loss, matcher=matcher, atss_topk=atss_topk)
