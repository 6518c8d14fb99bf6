"""Evaluation: COCO box AP (pycocotools), Pascal VOC mAP@0.5 (VOC07 11-point and VOC12 all-point,
written here) and top-1 / top-5 accuracy.

Detections are ``{image_id: {"boxes": N x 4 xyxy in the image's original pixels, "scores": N,
"labels": N (0..K-1)}}``. For COCO, labels are mapped back to category ids through the dataset's
``label_to_category_id`` and compared with the dataset's own annotation file (so AP small / medium /
large use its ``area`` field, as the official evaluation does); other datasets use
``dataset.coco_ground_truth()`` (category id = label + 1; VOC difficult boxes are ignored).

With ``distributed=True`` (several processes, each given a loader over its own share of the set) the
detections are gathered on rank 0, which computes the metrics, and every rank returns them; classification
counts are summed over the processes. Either way the numbers are those of one process over the whole set.

A checkpoint evaluated under torchrun (``vertebra eval``): :func:`eval_process_group` joins the process group
torchrun describes (nothing in one process) and :func:`evaluate_dataset` evaluates this process's share of the
set, every W-th image as the trainer's validation does, with the metrics over the whole set.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..precision import autocast

__all__ = ["COCO_METRICS", "coco_evaluate", "voc_ap", "voc_evaluate", "evaluate_detector", "evaluate_classifier",
           "predict_detections", "detections_to_coco", "eval_process_group", "evaluate_dataset"]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco(predictions: dict[int, dict[str, Any]], label_to_category_id) -> list[dict[str, Any]]:
    """COCO result entries ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``."""
    out = []
    for iid, det in predictions.items():
        boxes = _to_numpy(det["boxes"]).reshape(-1, 4).astype(np.float64)
        scores = _to_numpy(det["scores"]).reshape(-1).astype(np.float64)
        labels = _to_numpy(det["labels"]).reshape(-1).astype(np.int64)
        for b, s, lab in zip(boxes, scores, labels):
            out.append({"image_id": int(iid), "category_id": label_to_category_id(int(lab)),
                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                        "score": float(s)})
    return out


def coco_evaluate(dataset, predictions: dict[int, dict[str, Any]], *, verbose: bool = False,
                  breakdown: bool = False) -> dict[str, float]:
    """COCO box AP, AP50, AP75, AP small / medium / large of ``predictions`` on ``dataset`` (pycocotools).

    Only the dataset's images are evaluated (``params.imgIds``). Returns -1 for a figure with no ground
    truth (pycocotools' convention).

    ``breakdown``: also where the AP is lost, from the same evaluation: ``AP/<class>`` and ``AP50/<class>``
    for every category, and ``AP_agnostic`` / ``AP50_agnostic``, the class-agnostic figures (pycocotools
    with ``useCats=0``: a box counts when it finds an object of any class). A large gap between AP50 and
    AP50_agnostic says the detector finds the objects but confuses their classes.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ann_file = getattr(dataset, "ann_file", None)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        if ann_file is not None and hasattr(dataset, "label_to_category_id"):
            gt = COCO(str(ann_file))
            l2c = dataset.label_to_category_id

            def map_label(lab: int):
                return int(l2c[lab])
        else:
            gt = COCO()
            gt.dataset = dataset.coco_ground_truth()
            gt.createIndex()

            def map_label(lab: int):
                return lab + 1
    img_ids = [int(r.image_id) for r in dataset.records]
    results = detections_to_coco({k: v for k, v in predictions.items() if k in set(img_ids)}, map_label)
    if not results:  # no detection at all: every figure is 0
        out = {k: 0.0 for k in COCO_METRICS}
        if breakdown:
            for cid in sorted(gt.cats):
                out[f"AP/{_category_name(gt, cid)}"] = out[f"AP50/{_category_name(gt, cid)}"] = 0.0
            out["AP_agnostic"] = out["AP50_agnostic"] = 0.0
        return out
    with contextlib.redirect_stdout(sink):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: float(v) for k, v in zip(COCO_METRICS, ev.stats[:6])}
    if breakdown:
        out.update(_per_class_ap(ev, gt))
        with contextlib.redirect_stdout(sink):
            agn = COCOeval(gt, dt, "bbox")
            agn.params.imgIds = img_ids
            agn.params.useCats = 0
            agn.evaluate()
            agn.accumulate()
            agn.summarize()
        out["AP_agnostic"], out["AP50_agnostic"] = float(agn.stats[0]), float(agn.stats[1])
    if verbose:
        print(sink.getvalue())
    return out


def _category_name(gt, cid: int) -> str:
    return str(gt.cats[cid].get("name", cid))


def _per_class_ap(ev, gt) -> dict[str, float]:
    """AP and AP50 of each category from an accumulated COCOeval (all areas, 100 detections per image)."""
    prec = ev.eval["precision"]  # [T iou thresholds, R recall points, K classes, A areas, M max dets]
    a, m = list(ev.params.areaRngLbl).index("all"), len(ev.params.maxDets) - 1
    t50 = int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - 0.5)))
    out: dict[str, float] = {}
    for k, cid in enumerate(ev.params.catIds):
        name = _category_name(gt, cid)
        p = prec[:, :, k, a, m]
        p50 = p[t50]
        out[f"AP/{name}"] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        out[f"AP50/{name}"] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else -1.0
    return out


# --------------------------------------------------------------------------------------------- Pascal VOC


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """Average precision from a recall / precision curve (recall ascending).

    VOC07: the mean over the 11 recall thresholds 0, 0.1, ..., 1 of the best precision at a recall at
    least that high. VOC12 (and later): the area under the curve after making precision monotonically
    decreasing, summed over the points where recall changes.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            p = precision[recall >= t]
            ap += (p.max() if p.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(((mrec[i + 1] - mrec[i]) * mpre[i + 1]).sum())


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix1 = np.maximum(boxes[:, 0], box[0])
    iy1 = np.maximum(boxes[:, 1], box[1])
    ix2 = np.minimum(boxes[:, 2], box[2])
    iy2 = np.minimum(boxes[:, 3], box[3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    a = (box[2] - box[0]) * (box[3] - box[1])
    b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(a + b - inter, np.finfo(np.float64).eps)


def voc_evaluate(dataset, predictions: dict[int, dict[str, Any]], *, iou_thresh: float = 0.5,
                 use_07_metric: bool = True) -> dict[str, Any]:
    """Pascal VOC mAP: per class, detections sorted by score are true positives when they overlap an
    unclaimed ground-truth box by ``iou_thresh`` or more (best overlap first), false positives otherwise;
    a detection whose best match is a *difficult* box counts as neither, and difficult boxes are not
    counted in the recall. Boxes are continuous XYXY (no +1 pixel in the areas). Returns
    ``{"mAP": mean over classes with ground truth, "AP_per_class": {name: AP}}``.
    """
    num_classes = dataset.num_classes
    gts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for rec in dataset.records:
        diff = rec.flags.get("difficult", rec.flags.get("iscrowd", np.zeros(len(rec.labels), bool)))
        gts[int(rec.image_id)] = (np.asarray(rec.boxes, np.float64).reshape(-1, 4), np.asarray(rec.labels),
                                  np.asarray(diff, bool))
    per_class: dict[str, float] = {}
    aps = []
    for c in range(num_classes):
        npos = 0
        gt_c: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for iid, (b, lab, diff) in gts.items():
            m = lab == c
            gt_c[iid] = (b[m], diff[m], np.zeros(int(m.sum()), bool))
            npos += int((~diff[m]).sum())
        img, score, box = [], [], []
        for iid, det in predictions.items():
            if iid not in gt_c:
                continue
            lab = _to_numpy(det["labels"]).reshape(-1)
            m = lab == c
            if m.any():
                box.append(_to_numpy(det["boxes"]).reshape(-1, 4)[m].astype(np.float64))
                score.append(_to_numpy(det["scores"]).reshape(-1)[m].astype(np.float64))
                img.extend([iid] * int(m.sum()))
        if npos == 0:
            continue  # a class with no (non-difficult) ground truth has no AP
        if not img:
            per_class[dataset.categories[c]] = 0.0
            aps.append(0.0)
            continue
        box_a, score_a = np.concatenate(box), np.concatenate(score)
        order = np.argsort(-score_a, kind="stable")
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        for d, k in enumerate(order):
            gb, gdiff, used = gt_c[img[k]]
            if len(gb) == 0:
                fp[d] = 1
                continue
            ious = _iou_one_to_many(box_a[k], gb)
            j = int(ious.argmax())
            if ious[j] >= iou_thresh:
                if gdiff[j]:
                    continue
                if not used[j]:
                    used[j] = True
                    tp[d] = 1
                else:
                    fp[d] = 1
            else:
                fp[d] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec_ = tp / npos
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap = voc_ap(rec_, prec, use_07_metric)
        per_class[dataset.categories[c]] = ap
        aps.append(ap)
    return {"mAP": float(np.mean(aps)) if aps else 0.0, "AP_per_class": per_class}


# --------------------------------------------------------------------------------------------- running models


@torch.no_grad()
def predict_detections(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                       amp: str | None = None, progress=None) -> dict[int, dict[str, Tensor]]:
    """Run a detector over a loader of ``(images, targets)`` (collate_detection); boxes are mapped back
    to each image's original pixels with ``target["orig_size"]``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out: dict[int, dict[str, Tensor]] = {}
    try:
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            with autocast(device, amp):
                dets = model(images)
            for im, t, d in zip(images, targets, dets):
                h, w = im.shape[-2:]
                oh, ow = t.get("orig_size", (h, w))
                scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=torch.float32)
                out[int(t["image_id"])] = {"boxes": d["boxes"].float().cpu() * scale,
                                           "scores": d["scores"].float().cpu(), "labels": d["labels"].cpu()}
            if progress is not None:
                progress(len(images))
    finally:
        model.train(was_training)
    return out


def evaluate_detector(model: nn.Module, loader: Iterable, dataset, device="cpu", amp: str | None = None,
                      voc: bool = False, progress=None, distributed: bool = False,
                      breakdown: bool = False) -> dict[str, float]:
    """COCO metrics (and VOC07 / VOC12 mAP@0.5 when ``voc``; per class and class-agnostic with ``breakdown``:
    see :func:`coco_evaluate`) of a detector on ``dataset``. ``distributed``:
    ``loader`` covers this process's share of ``dataset``; the metrics are over every process's share."""
    from .distributed import all_gather_object, broadcast_object, is_main_process

    t0 = time.perf_counter()
    preds = predict_detections(model, loader, device, amp, progress)
    metrics: dict[str, float] | None = None
    if distributed:
        # rank r holds images r, r + W, ...: interleaving the parts gives back the data set's order
        parts = [list(p.items()) for p in all_gather_object(preds)]
        preds = {k: v for i in range(max(map(len, parts))) for part in parts if i < len(part) for k, v in [part[i]]}
    if not distributed or is_main_process():
        metrics = coco_evaluate(dataset, preds, breakdown=breakdown)
        if voc:
            metrics["mAP50_voc07"] = voc_evaluate(dataset, preds, use_07_metric=True)["mAP"]
            metrics["mAP50_voc12"] = voc_evaluate(dataset, preds, use_07_metric=False)["mAP"]
    if distributed:
        metrics = broadcast_object(metrics)
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable, device="cpu", amp: str | None = None,
                        progress=None, distributed: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in %) and mean cross-entropy of a classifier. ``distributed``: ``loader``
    covers this process's share; the counts are summed over the processes."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    n = c1 = c5 = 0
    loss = 0.0
    t0 = time.perf_counter()
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(x)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            logits = logits.float()
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            c1 += int(hit[:, 0].sum())
            c5 += int(hit.any(1).sum())
            n += len(y)
            if progress is not None:
                progress(len(y))
    finally:
        model.train(was_training)
    if distributed:
        from .distributed import all_reduce_sum

        totals = torch.tensor([n, c1, c5, loss], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        n, c1, c5 = (int(v) for v in all_reduce_sum(totals)[:3].tolist())
        loss = float(totals[3])
    n = max(n, 1)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n,
            "eval_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------- a whole set, sharded


@contextlib.contextmanager
def eval_process_group(device: str = "cpu", timeout_minutes: float = 30.0):
    """Under torchrun (``WORLD_SIZE`` > 1) join the process group for an evaluation (gloo on CPU, nccl on CUDA:
    :func:`~vertebra.engine.distributed.init_distributed`) and leave it at the end; in one process nothing is
    set up. Yields the :class:`~vertebra.engine.distributed.DistInfo`: its ``device`` is this process's
    (``cuda:LOCAL_RANK`` under torchrun on CUDA), ``rank`` 0 is the process that prints and writes. A group
    that was already up is used and left up."""
    from .distributed import cleanup_distributed, init_distributed, is_distributed

    was_up = is_distributed()
    info = init_distributed(device, timeout_minutes=timeout_minutes)
    try:
        yield info
    finally:
        if not was_up:
            cleanup_distributed()


def evaluate_dataset(task, model: nn.Module, dataset, *, device="cpu", batch_size: int = 8, num_workers: int = 0,
                     amp: str | None = None, voc: bool = False, breakdown: bool = False) -> dict[str, float]:
    """``task``'s metrics of ``model`` on the whole ``dataset`` (``task.evaluate``). With a process group of W > 1
    processes (:func:`eval_process_group` under torchrun) this process runs every W-th image from its rank on
    (``Subset``, no padding: nothing counts twice, as ``Trainer`` validates) and every process returns the
    metrics of the whole set (detections gathered on rank 0, classification counts summed); else one process
    runs them all."""
    from torch.utils.data import DataLoader, Subset

    from .distributed import get_rank, get_world_size

    world = get_world_size()
    share = dataset if world == 1 else Subset(dataset, range(get_rank(), len(dataset), world))
    loader = DataLoader(share, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=task.collate)
    return task.evaluate(model, loader, dataset, device=device, amp=amp, voc=voc, distributed=world > 1,
                         breakdown=breakdown)
