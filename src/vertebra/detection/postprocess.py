"""RetinaNet postprocessing: head outputs to detections, batched over images.

One algorithm, two modes of :class:`Postprocess`: eager (data-dependent shapes, the fastest path:
the candidates above the score threshold first) and ``exportable=True`` (static shapes: the top-k
of every score, the threshold and class-wise NMS in one ONNX ``NonMaxSuppression``), which
``detection/export.py`` puts into the exported graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, nms

from .boxes import decode_boxes

__all__ = ["Postprocess", "nms_per_class"]


def _clip(boxes: Tensor, hw: Tensor) -> Tensor:
    """Boxes clipped to their image: x to [0, w], y to [0, h]; ``hw`` (h, w) broadcast against the boxes."""
    hw = hw.to(boxes.dtype)
    upper = torch.stack((hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]), dim=-1)
    return torch.minimum(boxes.clamp(min=0), upper)


def _rank_in_group(group_sorted: Tensor, counts: Tensor) -> Tensor:
    """The position of every element within its group; ``group_sorted`` ascending, ``counts`` per group."""
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(group_sorted.shape[0], device=group_sorted.device) - first[group_sorted]


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX ``NonMaxSuppression`` (boxes [B, M, 4] xyxy, scores [B, K, M]) -> selected [S, 3] (b, k, m).

    Eagerly :func:`nms_per_class`; under ``torch.onnx.export`` the ONNX operator.
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_per_class: int, iou: float, score_thresh: float) -> Tensor:
        return nms_per_class(boxes, scores, max_per_class, iou, score_thresh)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou, score_thresh):
        mx = g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64))
        it = g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32))
        st = g.op("Constant", value_t=torch.tensor([score_thresh], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, mx, it, st, center_point_box_i=0)


def nms_per_class(boxes: Tensor, scores: Tensor, max_per_class: int, iou: float, score_thresh: float) -> Tensor:
    """ONNX ``NonMaxSuppression`` in PyTorch: selected ``[S, 3]`` (image, class, candidate) of boxes
    ``[B, M, 4]`` with scores ``[B, K, M]``: per (image, class) the scores above ``score_thresh``, NMS at
    ``iou``, at most ``max_per_class`` kept; ordered by (image, class), then by score."""
    b, k, m = scores.shape
    bi, ki, mi = (scores > score_thresh).nonzero(as_tuple=True)
    group = bi * k + ki
    bx, sc = boxes[bi, mi], scores[bi, ki, mi]
    if torch.compiler.is_exporting():
        # torch.export: no data-dependent branch (batched_nms picks an algorithm by size); offset the
        # boxes of every (image, class) group apart, as batched_nms does for small inputs
        offsets = group.to(bx.dtype) * (boxes.max() + 1.0)  # boxes: all candidates, never empty
        keep = nms(bx + offsets[:, None], sc, iou)
    else:
        keep = batched_nms(bx, sc, group, iou)  # by score, descending
    g_sorted, perm = torch.sort(group[keep], stable=True)
    keep = keep[perm]
    counts = (g_sorted.unsqueeze(0) == torch.arange(b * k, device=g_sorted.device).unsqueeze(1)).sum(1)
    keep = keep[_rank_in_group(g_sorted, counts) < max_per_class]
    return torch.stack((bi[keep], ki[keep], mi[keep]), dim=1)


class Postprocess(nn.Module):
    """Detections from head outputs, batched over images.

    Per level and image: the ``topk_candidates`` best (anchor, class) scores above
    ``score_thresh``, decoded and clipped to the image; then class-wise NMS over all images at
    once (``batched_nms`` with index ``image * K + class``) and the ``detections_per_img`` best
    per image; boxes scaled back to the input image.

    The candidates are found in one pass over all logits of the batch (a comparison with the
    threshold's logit, so the sigmoid is only taken of the candidates); the top-k per (image,
    level) is a rank within its group, needed only when a group has more than k candidates.

    With ``exportable=True`` the same steps run with static shapes, as one graph that ONNX and
    ``torch.export`` take (see :meth:`forward`): the top-k per (image, level) over every score, the
    threshold inside the NMS (ONNX ``NonMaxSuppression``, or ``torchvision::nms`` eagerly and in
    ``torch.export``). The detections are the same up to the order of equal scores.
    """

    def __init__(self, score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 300,
                 topk_candidates: int = 1000, exportable: bool = False):
        super().__init__()
        self.exportable = bool(exportable)
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

    def candidates(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor,
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
        boxes = _clip(decode_boxes(bbox_regression[bi, anchor_idx].float(), anchors[anchor_idx]), image_sizes[bi])
        return boxes, scores, labels, bi

    def forward(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, anchors_per_level: Sequence[int],
                image_sizes, original_sizes: Sequence[tuple[int, int]] | None = None):
        """Detections of head outputs ``cls_logits [B, N, K]``, ``bbox_regression [B, N, 4]``.

        Eager: one ``{"boxes", "scores", "labels"}`` per image; boxes in the resized image's pixels, or
        in the input's when ``original_sizes`` is given. ``exportable=True``: ``image_sizes`` an int64
        tensor ``[B, 2]``, the flat ``(boxes [D, 4], scores [D], labels [D], batch_index [D])`` in the
        batch's pixels, by image (ascending), then by score (descending).
        """
        if self.exportable:
            return self._flat(cls_logits, bbox_regression, anchors, anchors_per_level, image_sizes)
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
            sel = _rank_in_group(img_sorted, counts) < self.detections_per_img
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

    def _flat(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, anchors_per_level: Sequence[int],
              image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, _, k = cls_logits.shape
        boxes_l, scores_l, labels_l = [], [], []
        start = 0
        for n in anchors_per_level:
            s = torch.sigmoid(cls_logits[:, start:start + n].float()).reshape(b, n * k)
            top = min(self.topk_candidates, n * k)
            vals, idx = s.topk(top, dim=1)
            anchor = torch.div(idx, k, rounding_mode="floor")
            labels_l.append(idx - anchor * k)
            anchor = anchor + start
            codes = bbox_regression.float().gather(1, anchor.unsqueeze(-1).expand(b, top, 4))
            boxes_l.append(decode_boxes(codes, anchors[anchor.reshape(-1)].reshape(b, top, 4)))
            scores_l.append(vals)
            start += n
        scores = torch.cat(scores_l, 1)
        labels = torch.cat(labels_l, 1)
        boxes = _clip(torch.cat(boxes_l, 1), image_sizes.unsqueeze(1))
        # one score row per class: the candidate's score where it is of that class, -1 elsewhere
        onehot = labels.unsqueeze(1) == torch.arange(k, device=labels.device).view(1, k, 1)
        per_class = torch.where(onehot, scores.unsqueeze(1), torch.full_like(scores.unsqueeze(1), -1.0))
        if torch.onnx.is_in_onnx_export():
            sel = _NonMaxSuppression.apply(boxes, per_class, self.detections_per_img, self.nms_thresh,
                                           self.score_thresh)
        else:
            sel = nms_per_class(boxes, per_class, self.detections_per_img, self.nms_thresh, self.score_thresh)
        bi, ki, mi = sel[:, 0], sel[:, 1], sel[:, 2]  # [S]: image, class, candidate
        det_scores, det_boxes = scores[bi, mi], boxes[bi, mi]
        # by image, then by score (descending); the best detections_per_img of each image
        order = torch.argsort(bi.to(det_scores.dtype) * 4.0 - det_scores)
        bi, ki, det_scores, det_boxes = bi[order], ki[order], det_scores[order], det_boxes[order]
        counts = (bi.unsqueeze(0) == torch.arange(b, device=bi.device).unsqueeze(1)).sum(1)
        keep = _rank_in_group(bi, counts) < self.detections_per_img
        return det_boxes[keep], det_scores[keep], ki[keep], bi[keep]

