"""Box coding and IoU matching of anchors to ground truth, batched.

- Coding (R-CNN parametrisation, weights (1, 1, 1, 1) as torchvision's RetinaNet):
  ``dx = (gx - ax) / aw``, ``dy = (gy - ay) / ah``, ``dw = log(gw / aw)``, ``dh = log(gh / ah)``;
  decoding clamps dw, dh at log(1000 / 16).
- Matching (RetinaNet Sec. 4, "Anchors"): an anchor is foreground when its best IoU with a
  ground-truth box is >= 0.5, background below 0.4, ignored in between; every ground-truth box
  also claims the anchors of its highest IoU (ties included) even below 0.5 ("low-quality
  matches", torchvision's ``Matcher(allow_low_quality_matches=True)``). Targets are padded to a
  batch ``[B, M, 4]`` with a validity mask, so one image with no boxes is simply an image whose
  anchors are all background.
- ATSS matching (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via
  Adaptive Training Sample Selection", CVPR 2020, 1912.02424), an option: per ground-truth box, the
  ``topk`` anchors of every level whose centres are closest to the box centre are candidates; those
  whose IoU is at least the candidates' mean + standard deviation, and whose centre lies inside the
  box, are foreground; every other anchor is background (nothing is ignored). A small box thus gets
  about as many positives as a large one, where the fixed 0.5 threshold gives it one low-quality match.

The focal loss and the RetinaNet losses are in ``losses.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = [
    "BBOX_XFORM_CLIP",
    "encode_boxes",
    "decode_boxes",
    "box_iou_batched",
    "match_anchors",
    "match_anchors_atss",
    "pad_targets",
    "BELOW_LOW_THRESHOLD",
    "BETWEEN_THRESHOLDS",
]

BBOX_XFORM_CLIP = math.log(1000.0 / 16)
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def encode_boxes(gt: Tensor, anchors: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression targets ``[..., 4]`` of boxes ``gt`` relative to ``anchors`` (same leading shape)."""
    wx, wy, ww, wh = weights
    aw = anchors[..., 2] - anchors[..., 0]
    ah = anchors[..., 3] - anchors[..., 1]
    ax = anchors[..., 0] + 0.5 * aw
    ay = anchors[..., 1] + 0.5 * ah
    gw = gt[..., 2] - gt[..., 0]
    gh = gt[..., 3] - gt[..., 1]
    gx = gt[..., 0] + 0.5 * gw
    gy = gt[..., 1] + 0.5 * gh
    return torch.stack(
        (wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)), dim=-1
    )


def decode_boxes(codes: Tensor, anchors: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Boxes ``[..., 4]`` xyxy from regression ``codes`` and ``anchors`` (broadcasting leading dims)."""
    anchors = anchors.to(codes.dtype)
    wx, wy, ww, wh = weights
    aw = anchors[..., 2] - anchors[..., 0]
    ah = anchors[..., 3] - anchors[..., 1]
    ax = anchors[..., 0] + 0.5 * aw
    ay = anchors[..., 1] + 0.5 * ah
    dx, dy, dw, dh = codes.unbind(-1)
    if wx != 1.0:
        dx, dy, dw, dh = dx / wx, dy / wy, dw / ww, dh / wh
    dw = dw.clamp(max=BBOX_XFORM_CLIP)
    dh = dh.clamp(max=BBOX_XFORM_CLIP)
    cx = dx * aw + ax
    cy = dy * ah + ay
    half_w = 0.5 * (torch.exp(dw) * aw)
    half_h = 0.5 * (torch.exp(dh) * ah)
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def box_iou_batched(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU ``[B, M, N]`` of ``boxes1 [B, M, 4]`` and ``boxes2 [N, 4]`` (the anchors, shared)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    # x and y apart: four contiguous [B, M, N] passes instead of [B, M, N, 2] ones with a stride-2 inner
    # axis (several times faster on CPU, where matching is a visible part of a small training step)
    a1, a2 = boxes1.unsqueeze(-1).unbind(-2), boxes2.t().unbind(0)
    iw = torch.minimum(a1[2], a2[2]).sub_(torch.maximum(a1[0], a2[0])).clamp_(min=0)
    ih = torch.minimum(a1[3], a2[3]).sub_(torch.maximum(a1[1], a2[1])).clamp_(min=0)
    inter = iw.mul_(ih)
    union = (area1[..., None] + area2).sub_(inter)
    return inter.div_(union)


def pad_targets(targets: list[dict[str, Tensor]], device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Targets as a batch: boxes ``[B, M, 4]``, labels ``[B, M]`` and valid ``[B, M]`` (M >= 1).

    Padding boxes are a harmless unit box (never matched: their IoU row is masked out).
    """
    dev = device if device is not None else targets[0]["boxes"].device
    counts = torch.tensor([int(t["boxes"].shape[0]) for t in targets], device=dev)
    m = max(int(counts.max()) if len(targets) else 0, 1)
    unit = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=dev)
    boxes = pad_sequence([torch.cat((t["boxes"].to(dev, torch.float32), unit)) for t in targets], batch_first=True)
    labels = pad_sequence([t["labels"].to(dev, torch.int64) for t in targets], batch_first=True)
    boxes = boxes[:, :m]
    if labels.shape[1] < m:
        labels = torch.nn.functional.pad(labels, (0, m - labels.shape[1]))
    valid = torch.arange(m, device=dev)[None, :] < counts[:, None]
    boxes = torch.where(valid[..., None], boxes, unit)
    return boxes, labels, valid


def match_anchors(gt_boxes: Tensor, valid: Tensor, anchors: Tensor, fg_iou_thresh: float = 0.5,
                  bg_iou_thresh: float = 0.4, allow_low_quality_matches: bool = True) -> Tensor:
    """The matched ground-truth index ``[B, N]`` of every anchor; -1 background, -2 ignored.

    Batched form of torchvision's ``Matcher``: the IoU of padding boxes is -1, so they are never
    a best match and never claim low-quality matches.
    """
    iou = box_iou_batched(gt_boxes, anchors)  # [B, M, N]
    iou = iou.masked_fill_(~valid[..., None], -1.0)
    matched_vals, matches = iou.max(dim=1)  # [B, N]
    all_matches = matches.clone() if allow_low_quality_matches else None
    matches[matched_vals < bg_iou_thresh] = BELOW_LOW_THRESHOLD
    matches[(matched_vals >= bg_iou_thresh) & (matched_vals < fg_iou_thresh)] = BETWEEN_THRESHOLDS
    if all_matches is not None:
        best_per_gt = iou.max(dim=2, keepdim=True).values  # [B, M, 1]
        claimed = ((iou == best_per_gt) & valid[..., None]).any(dim=1)  # [B, N]
        matches = torch.where(claimed, all_matches, matches)
    return matches


def match_anchors_atss(gt_boxes: Tensor, valid: Tensor, anchors: Tensor, anchors_per_level: list[int],
                       topk: int = 9, allow_low_quality_matches: bool = True) -> Tensor:
    """ATSS: the matched ground-truth index ``[B, N]`` of every anchor, -1 for background (none ignored).

    ``anchors_per_level``: how many of ``anchors`` (level by level, as the head orders them) belong
    to each pyramid level. With ``allow_low_quality_matches`` a box none of whose candidates passes
    (a box smaller than the stride, whose cell centres all miss it) keeps its best-IoU anchor.
    """
    iou = box_iou_batched(gt_boxes, anchors)  # [B, M, N]
    iou = iou.masked_fill_(~valid[..., None], -1.0)
    gc = (gt_boxes[..., :2] + gt_boxes[..., 2:]) * 0.5  # [B, M, 2]
    ac = (anchors[:, :2] + anchors[:, 2:]) * 0.5  # [N, 2]
    dist = (gc[..., None, :] - ac[None, None]).square_().sum(-1)  # [B, M, N]
    cand, start = [], 0
    for n in anchors_per_level:  # a handful of levels, not images or boxes
        k = min(topk, n)
        cand.append(dist[..., start:start + n].topk(k, dim=-1, largest=False).indices + start)
        start += n
    cand = torch.cat(cand, dim=-1)  # [B, M, C]
    cand_iou = iou.gather(-1, cand)
    thr = cand_iou.mean(-1, keepdim=True) + cand_iou.std(-1, keepdim=True)  # [B, M, 1]
    ca = ac[cand]  # [B, M, C, 2]
    inside = ((ca - gt_boxes[..., None, :2]).amin(-1) > 0) & ((gt_boxes[..., None, 2:] - ca).amin(-1) > 0)
    ok = (cand_iou >= thr) & inside & valid[..., None]
    pos = torch.zeros_like(iou, dtype=torch.bool).scatter_(-1, cand, ok)  # [B, M, N]
    if allow_low_quality_matches:  # unconditionally: no host sync to ask whether any box needs it
        none = valid & ~ok.any(-1)  # [B, M]
        best = iou.argmax(-1, keepdim=True)  # [B, M, 1]
        pos.scatter_(-1, best, pos.gather(-1, best) | none[..., None])
    # an anchor positive for several boxes goes to the one it overlaps most
    score = torch.where(pos, iou, torch.full_like(iou, -2.0))
    best_val, matches = score.max(dim=1)  # [B, N]
    return torch.where(best_val > -2.0, matches, torch.full_like(matches, BELOW_LOW_THRESHOLD))
