"""The RetinaNet losses: focal loss on the classification logits, L1 or GIoU on the box codes.

- Focal loss (Lin et al., Sec. 3.2, alpha 0.25, gamma 2), summed and normalised per image by its
  number of foreground anchors (at least 1), then averaged over the batch, as torchvision does.
- Box loss over the foreground anchors with the same per-image normalisation: L1 on the box codes
  (torchvision's v1; the paper uses smooth L1) or the GIoU of the decoded boxes (v2).

Anchors are assigned by the fixed 0.5 / 0.4 IoU thresholds or by ATSS (``boxes.match_anchors`` /
``boxes.match_anchors_atss``). Everything runs in the dtype of the logits (float32 from RetinaNet).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from .boxes import BETWEEN_THRESHOLDS, decode_boxes, encode_boxes, match_anchors, match_anchors_atss, pad_targets

__all__ = ["focal_loss_dense", "retinanet_losses"]


class _FocalNegative(torch.autograd.Function):
    """sum(w * (1 - alpha) * p^gamma * softplus(x)) and its gradient, without keeping intermediates.

    This is the focal loss of every logit taken as a negative (target 0); the few positive
    entries are corrected sparsely by the caller.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, alpha: float, gamma: float) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.alpha, ctx.gamma = alpha, gamma
        p = torch.sigmoid(x)
        pg = p * p if gamma == 2.0 else p.pow(gamma)
        loss = pg.mul_(F.softplus(x))
        return loss.mul_(w).sum() * (1.0 - alpha)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        p = torch.sigmoid(x)
        # d/dx [p^g * softplus(x)] = p^g * (p + g * (1 - p) * softplus(x))
        sp = F.softplus(x)
        q = (1.0 - p).mul_(sp).mul_(gamma).add_(p)
        pg = p.mul_(p) if gamma == 2.0 else p.pow_(gamma)
        g = pg.mul_(q).mul_(w)
        return g.mul_(grad * (1.0 - alpha)), None, None, None


def _focal_elementwise(x: Tensor, t: float, alpha: float, gamma: float) -> Tensor:
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, torch.full_like(x, t), reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    return a_t * ce * (1 - p_t) ** gamma


def focal_loss_dense(logits: Tensor, anchor_weight: Tensor, pos_index: tuple[Tensor, Tensor, Tensor],
                     pos_weight: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Weighted sigmoid focal loss of ``logits [B, N, K]`` whose targets are one-hot and sparse.

    ``anchor_weight [B, N]``: the weight of every anchor (0 for ignored ones, 1 / num_fg of its
    image otherwise); ``pos_index`` (b, n, k) and ``pos_weight``: the entries whose target is 1.
    Equal to ``sum(w * sigmoid_focal_loss(logits, one_hot))`` at a fraction of its memory.
    """
    w = anchor_weight.to(logits.dtype)[..., None].expand_as(logits)
    loss = _FocalNegative.apply(logits, w, alpha, gamma)
    if pos_index[0].numel():
        xp = logits[pos_index]
        corr = _focal_elementwise(xp, 1.0, alpha, gamma) - _focal_elementwise(xp, 0.0, alpha, gamma)
        loss = loss + (corr * pos_weight.to(logits.dtype)).sum()
    return loss


def retinanet_losses(cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, anchors_per_level: Sequence[int],
                     targets: list[dict[str, Tensor]], *, matcher: str = "iou", fg_iou_thresh: float = 0.5,
                     bg_iou_thresh: float = 0.4, atss_topk: int = 9, focal_alpha: float = 0.25,
                     focal_gamma: float = 2.0, box_loss: str = "l1") -> dict[str, Tensor]:
    """``{"classification", "box_regression"}`` of head outputs ``[B, N, K]`` / ``[B, N, 4]`` against
    ``targets`` (boxes in the preprocessed batch's pixels)."""
    b = cls_logits.shape[0]
    gt_boxes, gt_labels, valid = pad_targets(targets, device=cls_logits.device)
    if matcher == "atss":
        matches = match_anchors_atss(gt_boxes, valid, anchors, list(anchors_per_level), atss_topk)
    else:
        matches = match_anchors(gt_boxes, valid, anchors, fg_iou_thresh, bg_iou_thresh)
    fg = matches >= 0
    norm = 1.0 / (fg.sum(1).clamp(min=1).to(cls_logits.dtype) * b)  # per image: 1 / (num_fg * B)
    anchor_w = (matches != BETWEEN_THRESHOLDS).to(cls_logits.dtype) * norm[:, None]
    bi, ni = fg.nonzero(as_tuple=True)
    gi = matches[bi, ni]
    ki = gt_labels[bi, gi]
    pos_w = norm[bi]
    cls_loss = focal_loss_dense(cls_logits, anchor_w, (bi, ni, ki), pos_w, focal_alpha, focal_gamma)
    reg = bbox_regression[bi, ni]
    if box_loss == "giou":
        pred = decode_boxes(reg, anchors[ni])
        per_anchor = generalized_box_iou_loss(pred, gt_boxes[bi, gi], reduction="none", eps=1e-7)
    else:
        per_anchor = (reg - encode_boxes(gt_boxes[bi, gi], anchors[ni])).abs().sum(-1)
    return {"classification": cls_loss, "box_regression": (per_anchor * pos_w).sum()}
