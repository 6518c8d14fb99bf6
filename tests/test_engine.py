"""The training / evaluation / prediction engine: tiny generated sets, tiny models, a few steps (CPU)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vertebra.cli import main
from vertebra.data import CocoDetection, write_shapes
from vertebra.data.sources import DataSource
from vertebra.data.transforms import detection_transforms
from vertebra.engine.checkpoint import CheckpointError, load_checkpoint
from vertebra.engine.config import TrainConfig
from vertebra.engine.evaluate import coco_evaluate, voc_ap, voc_evaluate
from vertebra.engine.models import load_model
from vertebra.engine.train import NonFiniteLossError, Trainer
from vertebra.precision import cpu_bf16_supported

SIZE = 96
BACKBONE = "shufflenet_v2_x0_5"
SMALL_DET = {"fpn_channels": 32}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine") / "shapes"
    write_shapes(root, num_train=16, num_val=8, size=SIZE, seed=3)
    return root


def det_config(shapes, out, **kw) -> TrainConfig:
    base = dict(source=DataSource(data=str(shapes)), size=SIZE, backbone=BACKBONE, batch=4, epochs=2,
                optimizer="adamw", lr=1e-3, detector_kwargs=dict(SMALL_DET, head_convs=1), out=str(out),
                progress=False, log_every=1,
                augment="none", warmup_steps=0, threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "det"
    cfg = det_config(shapes, out, epochs=1, ema=0.9)
    Trainer(cfg).fit()
    return out


def test_detection_loss_falls_and_run_folder(shapes, tmp_path):
    # overfit 8 images (the val split as a COCO training set): the loss must fall
    cfg = det_config(shapes, tmp_path / "run", epochs=6, eval_every=100,
                     source=DataSource(coco_ann=str(shapes / "annotations" / "instances_val.json"),
                                       coco_images=str(shapes / "val")))
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 12
    rows = [r for r in _csv(tmp_path / "run" / "metrics.csv") if r["kind"] == "train"]
    losses = [float(r["loss"]) for r in rows]
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert last < 0.8 * first, losses
    for f in ("config.json", "metrics.csv", "loss.png", "last.safetensors", "last.json"):
        assert (tmp_path / "run" / f).is_file(), f
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("step", "epoch", "loss", "loss_classification", "loss_box_regression", "lr", "images_per_s"):
        assert col in header
    cfg_saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_saved["backbone"] == BACKBONE


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_is_exact(shapes, tmp_path):
    kw = dict(epochs=3, ema=0.9, clip=1.0, augment="flip", optimizer="sgd", lr=0.01, warmup_steps=2, eval_every=100)
    a = Trainer(det_config(shapes, tmp_path / "a", max_steps=6, **kw))
    a.fit()
    b = Trainer(det_config(shapes, tmp_path / "b", max_steps=3, **kw))  # stops mid-epoch (4 steps / epoch)
    b.fit()
    assert load_checkpoint(tmp_path / "b" / "last.safetensors").state["step"] == 3
    b2 = Trainer(det_config(shapes, tmp_path / "b", max_steps=6, **kw), resume=True)
    assert b2.step == 3
    b2.fit()
    assert a.step == b2.step == 6
    sa, sb = a.model.state_dict(), b2.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k in a.ema.shadow:
        assert torch.equal(a.ema.shadow[k], b2.ema.shadow[k]), k


def test_nonfinite_loss_stops_and_keeps_checkpoint(shapes, tmp_path, monkeypatch):
    cfg = det_config(shapes, tmp_path / "nan", epochs=3, eval_every=100)
    t = Trainer(cfg)
    real = t.compute_loss

    def poisoned(batch):
        total, parts, n = real(batch)
        if t.step == 5:  # the 6th step: after the first epoch's checkpoint (4 steps / epoch)
            total = total * float("nan")
        return total, parts, n

    monkeypatch.setattr(t, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 6.*last good checkpoint is .*last\.safetensors"):
        t.fit()
    ck = load_checkpoint(tmp_path / "nan" / "last.safetensors")
    assert ck.state["step"] == 4
    for k, v in ck.tensors("model").items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k


def _gt(shapes, split="val"):
    ds = CocoDetection(shapes / split, shapes / "annotations" / f"instances_{split}.json",
                       detection_transforms(False, SIZE))
    return ds


def test_coco_eval_perfect_detections(shapes):
    ds = _gt(shapes)
    preds = {int(r.image_id): {"boxes": torch.from_numpy(r.boxes), "scores": torch.ones(len(r.labels)),
                               "labels": torch.from_numpy(r.labels)} for r in ds.records}
    m = coco_evaluate(ds, preds)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    v = voc_evaluate(ds, preds)
    assert v["mAP"] == pytest.approx(1.0)


def test_coco_eval_matches_pycocotools(shapes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = _gt(shapes)
    rng = np.random.default_rng(0)
    preds, results = {}, []
    for r in ds.records:
        b = r.boxes.copy() + rng.uniform(-3, 3, r.boxes.shape).astype(np.float32)  # shifted boxes
        lab = r.labels.copy()
        lab[rng.random(len(lab)) < 0.2] = 0  # some wrong classes
        fp = np.array([[5, 5, 30, 40]], np.float32)  # a false positive per image
        b = np.concatenate([b, fp])
        lab = np.concatenate([lab, [1]])
        s = rng.uniform(0.05, 1, len(lab)).astype(np.float32)
        preds[int(r.image_id)] = {"boxes": torch.from_numpy(b), "scores": torch.from_numpy(s),
                                  "labels": torch.from_numpy(lab)}
        for bb, ss, ll in zip(b, s, lab):
            results.append({"image_id": int(r.image_id), "category_id": ds.label_to_category_id[int(ll)],
                            "bbox": [float(bb[0]), float(bb[1]), float(bb[2] - bb[0]), float(bb[3] - bb[1])],
                            "score": float(ss)})
    ours = coco_evaluate(ds, preds)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(shapes / "annotations" / "instances_val.json"))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ref = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats[:6]))
    assert 0.05 < ours["AP50"] < 1.0
    for k, v in ref.items():
        assert ours[k] == pytest.approx(float(v), abs=1e-9), k


def test_coco_eval_breakdown(shapes):
    """Per-class AP equals pycocotools run on that class alone; right boxes with wrong classes score 0
    class-aware and 1 class-agnostic."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = _gt(shapes)
    k = len(ds.categories)
    rng = np.random.default_rng(1)
    preds, wrong, results = {}, {}, []
    for r in ds.records:
        b = r.boxes + rng.uniform(-4, 4, r.boxes.shape).astype(np.float32)
        s = rng.uniform(0.05, 1, len(r.labels)).astype(np.float32)
        preds[int(r.image_id)] = {"boxes": torch.from_numpy(b), "scores": torch.from_numpy(s),
                                  "labels": torch.from_numpy(r.labels)}
        wrong[int(r.image_id)] = {"boxes": torch.from_numpy(r.boxes), "scores": torch.ones(len(r.labels)),
                                  "labels": torch.from_numpy((r.labels + 1) % k)}
        for bb, ss, ll in zip(b, s, r.labels):
            results.append({"image_id": int(r.image_id), "category_id": ds.label_to_category_id[int(ll)],
                            "bbox": [float(bb[0]), float(bb[1]), float(bb[2] - bb[0]), float(bb[3] - bb[1])],
                            "score": float(ss)})
    ours = coco_evaluate(ds, preds, breakdown=True)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(shapes / "annotations" / "instances_val.json"))
        dt = gt.loadRes(results)
        for cid in gt.getCatIds():
            if not gt.getAnnIds(catIds=[cid], imgIds=[int(r.image_id) for r in ds.records]):
                continue
            ev = COCOeval(gt, dt, "bbox")
            ev.params.imgIds = [int(r.image_id) for r in ds.records]
            ev.params.catIds = [cid]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            name = gt.cats[cid]["name"]
            assert ours[f"AP/{name}"] == pytest.approx(float(ev.stats[0]), abs=1e-9), name
            assert ours[f"AP50/{name}"] == pytest.approx(float(ev.stats[1]), abs=1e-9), name
    assert 0.0 < ours["AP_agnostic"] <= 1.0 and 0.0 < ours["AP50_agnostic"] <= 1.0
    m = coco_evaluate(ds, wrong, breakdown=True)
    assert m["AP50"] < 0.1 and m["AP50_agnostic"] == pytest.approx(1.0)  # > 0: boxes overlapping a box of that class
    assert set(m) == set(ours)


def test_voc_ap_by_hand():
    # 2 ground-truth boxes; detections by score: TP, FP, TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)

    class DS:  # a minimal dataset: one image, two boxes of class 0 and a difficult one
        num_classes, categories = 1, ["a"]

        class R:
            image_id = 1
            boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
            labels = np.array([0, 0, 0])
            flags = {"difficult": np.array([False, False, True])}

        records = [R]

    preds = {1: {"boxes": torch.tensor([[0, 0, 10, 10], [60, 60, 70, 70], [40, 40, 50, 50], [20, 20, 30, 31.]]),
                 "scores": torch.tensor([0.9, 0.8, 0.75, 0.7]), "labels": torch.tensor([0, 0, 0, 0])}}
    # the detection on the difficult box is neither TP nor FP
    assert voc_evaluate(DS, preds, use_07_metric=False)["mAP"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_classification_on_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for cls, col in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            d = tmp_path / "folder" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(col) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    cfg = TrainConfig(task="cls", source=DataSource(folder=str(tmp_path / "folder")), backbone="resnet18", size=32,
                      batch=4, epochs=2, optimizer="adamw", lr=1e-3, label_smoothing=0.1, ema=0.5,
                      out=str(tmp_path / "cls"), progress=False, log_every=1, threads=1)
    t = Trainer(cfg)
    s = t.fit()
    assert s["steps"] == 8
    assert set(s["last_eval"]) >= {"top1", "top5"} and 0 <= s["last_eval"]["top1"] <= 100
    model, state = load_model(tmp_path / "cls" / "last.safetensors")
    assert state["model"]["categories"] == ["blue", "red"]
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 2)


def test_bf16_refused_where_the_cpu_has_none(shapes, trained, tmp_path, monkeypatch, capsys):
    """On a CPU without bfloat16 convolutions (torch's would fail mid-run in mkldnn_convolution), every bf16
    request is one line naming its flag, before any work; ``--amp`` (auto) falls back to float32."""
    import vertebra
    import vertebra.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    assert precision.resolve_amp("auto", "cpu") is None and precision.resolve_amp("auto", "cuda") == "fp16"
    with pytest.raises(ValueError, match="no bfloat16 convolutions"):
        vertebra.optimize_for_inference(vertebra.create_backbone("resnet18", num_classes=2), dtype=torch.bfloat16)
    image = str(shapes / "val" / "000000.jpg")
    runs = [["predict", image, "--checkpoint", str(trained / "last.safetensors"), "--out", str(tmp_path / "p"),
             "--device", "cpu", "--dtype", "bf16"],
            ["train", "--data", str(shapes), "--backbone", BACKBONE, "--size", str(SIZE), "--epochs", "1",
             "--device", "cpu", "--dtype", "bf16", "--out", str(tmp_path / "run"), "--no-progress"]]
    for argv, flag in zip(runs, ["--dtype", "--dtype"]):
        assert _cli(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        # argparse's usage, then one line naming the flag
        assert f"error: argument {flag}:" in err[-1] and "bfloat16" in err[-1], err
    assert not (tmp_path / "p").exists()


def _cli(argv):
    """``vertebra ARGV``'s exit code (a usage error's too)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_predict_and_eval_commands(shapes, trained, tmp_path):
    ck = trained / "last.safetensors"
    images = [str(shapes / "val" / "000000.jpg"), str(shapes / "val" / "000001.jpg")]
    assert _cli(["predict", *images, "--checkpoint", str(ck), "--out", str(tmp_path / "pred"),
                 "--score-thresh", "0.0", "--device", "cpu"]) == 0
    assert (tmp_path / "pred" / "000000.jpg").is_file() and (tmp_path / "pred" / "000001.jpg").is_file()
    res = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(res) == 2 and res[0]["image"] == images[0]
    for d in res[0]["detections"]:
        assert 1 <= d["category_id"] <= 6 and d["category"] in ("circle", "square", "triangle", "star", "cross",
                                                                "hexagon")
    # --bf16 runs end to end and writes the same outputs (the bf16 numerics are tested in test_detection:
    # this barely trained model has few or no scores above the threshold); a CPU without bf16 convolutions
    # refuses it in one line (test_bf16_refused_where_the_cpu_has_none)
    if cpu_bf16_supported():
        assert _cli(["predict", *images, "--checkpoint", str(ck), "--out", str(tmp_path / "pred16"),
                     "--score-thresh", "0.0", "--device", "cpu", "--dtype", "bf16"]) == 0
        res16 = json.loads((tmp_path / "pred16" / "predictions.json").read_text())
        assert [r["image"] for r in res16] == images and (tmp_path / "pred16" / "000000.jpg").is_file()
    out = tmp_path / "eval.json"
    assert _cli(["eval", "--checkpoint", str(ck), "--out", str(out), "--device", "cpu", "--batch", "4"]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert set(m) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"} and m["images"] == 8
    assert _cli(["eval", "--checkpoint", str(ck), "--out", str(out), "--device", "cpu", "--batch", "4",
                 "--per-class"]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert {"AP_agnostic", "AP50_agnostic", "AP50/circle", "AP/hexagon"} <= set(m)


def test_predict_skips_and_counts_what_is_not_an_image(shapes, trained, tmp_path, capsys):
    """A folder with a text file and a corrupt JPEG: the good images are written, the rest counted."""
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("000000.jpg", "000001.jpg"):
        shutil.copy(shapes / "val" / name, folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes((shapes / "val" / "000002.jpg").read_bytes()[:200])
    png = folder / "000000.png"  # the same stem as a JPEG: both pictures are kept
    shutil.copy(shapes / "val" / "000003.jpg", png)
    out = tmp_path / "pred"
    assert _cli(["predict", str(folder), "--checkpoint", str(trained / "last.safetensors"), "--out", str(out),
                 "--device", "cpu"]) == 0
    res = json.loads((out / "predictions.json").read_text())
    assert sorted(Path(r["image"]).name for r in res) == ["000000.jpg", "000000.png", "000001.jpg"]
    assert sorted(p.name for p in out.glob("*.jpg")) == ["000000-2.jpg", "000000.jpg", "000001.jpg"]
    io_ = capsys.readouterr()
    text = " ".join((io_.out + io_.err).split())
    assert "skipped 1 of 4 images (corrupt image: 1)" in text and "broken.jpg" in text
    assert "left out 1 file(s) of the folders that are not images (notes.txt)" in text
    # nothing readable: exit 2
    assert _cli(["predict", str(folder / "broken.jpg"), "--checkpoint", str(trained / "last.safetensors"),
                 "--out", str(tmp_path / "none"), "--device", "cpu"]) == 2


def test_data_counts_printed_and_in_config(shapes, tmp_path, capsys):
    """Boxes clipped to the image, annotations dropped (with --skip-bad), images without boxes: one line per split
    when the data loads, and config.json's "data"."""
    ann = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    img = ann["images"][0]
    extra = [dict(id=9001, image_id=img["id"], category_id=ann["categories"][0]["id"], bbox=b, iscrowd=0, area=1)
             for b in ([-5, -5, 20, 20], [img["width"] - 10, 3, 30, 10],  # partly outside: clipped
                       [3, 3, -4, 5], [3, 3, 0, 5], [img["width"] + 1, 2, 5, 5])]  # negative, zero, outside
    for k, e in enumerate(extra):
        e["id"] += k
    ann["annotations"] += extra
    ann["images"].append(dict(img, id=999, file_name=img["file_name"]))  # a second entry, no annotations
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    n_boxes = len(ann["annotations"]) - 3
    empty = sum(1 for im in ann["images"] if not any(a["image_id"] == im["id"] for a in ann["annotations"]))
    rc = _cli(["train", "--coco", str(path), "--images", str(shapes / "train"), "--skip-bad", "--backbone", BACKBONE,
               "--size", str(SIZE), "--batch", "4", "--max-steps", "1", "--out", str(tmp_path / "run"),
               "--no-progress", "--detector-kw", "fpn_channels=32", "--head-convs", "1", "--device", "cpu",
               "--threads", "1"])
    assert rc == 0
    counts = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert set(counts) == {"train"}
    assert counts["train"] == {"images": len(ann["images"]), "boxes": n_boxes, "classes": len(ann["categories"]),
                               "images_without_boxes": empty, "clipped_boxes": 2, "ignored_crowd": 0,
                               "skipped": {"negative box size": 1, "zero-area box": 1, "box outside image": 1}}
    out = " ".join(capsys.readouterr().out.split())
    assert (f"train: {len(ann['images'])} images ({empty} without boxes, kept), {n_boxes} boxes of 6 classes; "
            "clipped 2 boxes to their image; skipped 3 (box outside image: 1, negative box size: 1, zero-area "
            "box: 1)") in out, out
    assert "no validation set: the run is not evaluated" in out


def test_an_error_message_keeps_its_brackets(shapes, tmp_path, capsys):
    """Rich markup is never read in a message: the bbox error says what a bbox must be."""
    ann = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    ann["annotations"][0]["bbox"] = [1, 2, 3]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    assert _cli(["train", "--coco", str(path), "--images", str(shapes / "val"), "--device", "cpu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "bbox must be [x, y, width, height] numbers, got [1, 2, 3]" in err, err


def test_train_command_runs(shapes, tmp_path):
    rc = _cli(["train", "--data", str(shapes), "--backbone", BACKBONE, "--size", str(SIZE), "--batch", "4",
               "--epochs", "1", "--max-steps", "2", "--out", str(tmp_path / "cli"), "--no-progress",
               "--detector-kw", "fpn_channels=32", "--head-convs", "1", "--device", "cpu", "--threads", "1"])
    assert rc == 0
    assert load_checkpoint(tmp_path / "cli" / "last.safetensors").state["step"] == 2


def test_bad_checkpoints_name_the_file(tmp_path, trained, capsys):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="nope.safetensors: checkpoint not found"):
        load_model(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt.safetensors: cannot read checkpoint"):
        load_model(corrupt)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="plain.safetensors: not a vertebra checkpoint"):
        load_model(plain)
    # a truncated copy of a real one
    data = (trained / "last.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_model(cut)
    # weights for another model: the description says 3 classes, the weights are for 6
    from vertebra.engine.checkpoint import save_checkpoint

    ck = load_checkpoint(trained / "last.safetensors")
    state = dict(ck.state, model=dict(ck.state["model"], num_classes=3, categories=["a", "b", "c"]))
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, {"model": ck.tensors("model")}, state, sidecar=False)
    with pytest.raises(CheckpointError, match="other.safetensors: the weights do not fit"):
        load_model(other, ema=False)
    assert _cli(["eval", "--checkpoint", str(missing), "--device", "cpu"]) == 2
    # a size the checkpoint's backbone cannot take, before any data is read
    assert _cli(["eval", "--checkpoint", str(trained / "last.safetensors"), "--size", "16", "--device", "cpu"]) == 2
    assert f"{BACKBONE} needs inputs of at least 32 px" in capsys.readouterr().err


def test_lr_schedule_shapes():
    from vertebra.engine.optim import lr_factor

    cfg = TrainConfig(epochs=10, warmup_factor=0.0)
    f = [lr_factor(s, cfg, 10, 100, 10) for s in range(100)]
    assert f[0] == 0.0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert f[99] < 0.01 and all(a >= b for a, b in zip(f[10:], f[11:]))
    cfg = TrainConfig(epochs=10, schedule="step", step_epochs=[5, 8])
    assert lr_factor(49, cfg, 10, 100, 0) == 1.0 and lr_factor(50, cfg, 10, 100, 0) == pytest.approx(0.1)
    assert lr_factor(85, cfg, 10, 100, 0) == pytest.approx(0.01)
    # the Inception-v3 rule: x0.94 every two epochs, by name or as RMSProp's step schedule
    for cfg in (TrainConfig(schedule="inception"), TrainConfig(optimizer="rmsprop", schedule="step")):
        assert cfg.resolved_schedule() == "inception"
        assert [lr_factor(s, cfg, 10, 100, 0) for s in (0, 19, 20, 45)] == pytest.approx([1, 1, 0.94, 0.94**2])
    assert math.isfinite(lr_factor(0, TrainConfig(optimizer="rmsprop", schedule="step"), 10, 100, 0))


def test_skip_bad_counts_and_reports(shapes, tmp_path):
    import shutil

    from vertebra.data import ImageError

    bad = tmp_path / "bad"
    shutil.copytree(shapes, bad)
    (bad / "train" / "000002.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageError, match="000002.jpg"):
        Trainer(det_config(bad, tmp_path / "r1", max_steps=4, eval_every=100)).fit()
    s = Trainer(det_config(bad, tmp_path / "r2", max_steps=4, eval_every=100, skip_bad=True)).fit()
    assert s["steps"] == 4
    assert any("skipped 1" in line and "corrupt image" in line for line in s["skipped"]), s["skipped"]


def test_detections_are_mapped_back_to_original_pixels(shapes):
    """The evaluation resizes images (96 -> 64 px); a detector that is right in the resized pixels must score
    AP 1 once its boxes are mapped back with orig_size."""
    from torch.utils.data import DataLoader

    from vertebra.data import collate_detection
    from vertebra.engine.evaluate import evaluate_detector

    ds = CocoDetection(shapes / "val", shapes / "annotations" / "instances_val.json", detection_transforms(False, 64))
    queue = list(ds.records)

    class Oracle(torch.nn.Module):
        def forward(self, images):
            out = []
            for im in images:
                r = queue.pop(0)
                s = im.shape[-1] / r.width
                out.append({"boxes": torch.from_numpy(r.boxes) * s, "scores": torch.ones(len(r.labels)),
                            "labels": torch.from_numpy(r.labels)})
            return out

    loader = DataLoader(ds, batch_size=3, collate_fn=collate_detection)
    m = evaluate_detector(Oracle(), loader, ds, voc=True)
    assert m["AP50"] == pytest.approx(1.0) and m["AP"] > 0.9 and m["mAP50_voc07"] == pytest.approx(1.0)


def _color_folder(root, n_train=8, n_val=4, px=32):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls, col in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(col) + rng.normal(0, 20, (px, px, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_rmsprop_aux_heads_step_schedule(tmp_path):
    folder = _color_folder(tmp_path / "folder")
    cfg = TrainConfig(task="cls", source=DataSource(folder=str(folder)), backbone="googlenet",
                      backbone_kwargs={"aux_logits": True},
                      size=64, batch=4, epochs=2, optimizer="rmsprop", schedule="step", clip=2.0,
                      out=str(tmp_path / "g"), progress=False, log_every=1, threads=1, max_steps=2, eval_every=100)
    t = Trainer(cfg)
    from vertebra.engine.optim import RMSpropTF

    assert isinstance(t.optimizer, RMSpropTF)
    assert t.task.aux_weight == pytest.approx(0.3)
    batch = next(iter(t._train_loader(0, 0)))
    t.model.train()
    total, parts, n = t.compute_loss(batch)
    assert n == 4 and float(total.detach()) > float(parts["main"])  # the auxiliary losses are added
    s = t.fit()
    assert s["steps"] == 2


def test_progressive_resizing_sizes_and_boxes(shapes, tmp_path):
    # 2 epochs of 16 train images at batch 4 = 8 steps: 64 px for the first half, then the run's own 96 px; the
    # ground-truth boxes are scaled with the images
    cfg = det_config(shapes, tmp_path / "prog", progressive=[[64, 0.5]], eval_every=100)
    t = Trainer(cfg)
    seen: list[tuple[int, int]] = []
    boxes_max: list[float] = []

    def preprocessed(module, args, output):  # the detector's preprocessing: the batch and the scaled targets
        batch, targets = output
        seen.append(tuple(batch.tensor.shape[-2:]))
        if targets is not None:
            boxes_max.append(max((float(tg["boxes"].max()) for tg in targets if len(tg["boxes"])), default=0.0))

    t.model.transform.register_forward_hook(preprocessed)
    s = t.fit()
    assert s["steps"] == 8
    train_seen = seen[:8]  # then the evaluation at the run's size
    assert train_seen == [(64, 64)] * 4 + [(96, 96)] * 4
    assert all(b <= 64 for b in boxes_max[:4]) and max(boxes_max[4:]) > 64
    assert len(seen) > 8 and all(sz == (96, 96) for sz in seen[8:])  # evaluation at the run's own size
    assert t.train_size() is None and t.schedule_fraction() == 1.0


def test_progressive_config_and_cli_errors():
    from vertebra.cli.train import _progressive
    from vertebra.engine.optim import progressive_size

    assert _progressive("128:0.5,192:0.75") == [[128, 0.5], [192, 0.75]]
    with pytest.raises(argparse.ArgumentTypeError, match="SIZE:UNTIL"):
        _progressive("128")
    with pytest.raises(argparse.ArgumentTypeError, match="'x:0.5'"):
        _progressive("128:0.2,x:0.5")
    for bad, msg in (([[128, 0.5], [192, 0.4]], "until must increase"), ([[8, 0.5]], "size must be an integer"),
                     ([[128, 1.5]], "until must increase"), ([[128]], "pair")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(size=256, progressive=bad).validate()
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(schedule_on_time=True).validate()
    prog = [[128, 0.5], [192, 0.75]]
    assert [progressive_size(prog, f, 256) for f in (0.0, 0.49, 0.5, 0.74, 0.75, 1.0)] == \
        [128, 128, 192, 192, None, None]


def test_progressive_resizing_classification(tmp_path):
    folder = _color_folder(tmp_path / "folder")
    cfg = TrainConfig(task="cls", source=DataSource(folder=str(folder)), backbone="resnet18", size=64, batch=4,
                      epochs=2,
                      optimizer="adamw", lr=1e-3, out=str(tmp_path / "c"), progress=False, log_every=1, threads=1,
                      progressive=[[32, 0.5]], eval_every=100)
    t = Trainer(cfg)
    seen = []
    t.model.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])) if mod.training
                                      else None)
    s = t.fit()
    assert s["steps"] == 8
    assert seen == [(32, 32)] * 4 + [(64, 64)] * 4


def test_train_command_parses_progressive_and_time_schedule():
    from vertebra.cli import build_parser
    from vertebra.cli.train import config_from_args

    p = build_parser()
    args = p.parse_args(["train", "--max-minutes", "15", "--schedule-on-time", "--progressive", "128:0.6,192:0.8",
                         "--device", "cpu"])
    cfg = config_from_args(args)
    assert cfg.schedule_on_time and cfg.max_minutes == 15 and cfg.progressive == [[128, 0.6], [192, 0.8]]
    cfg.validate()
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
        p.parse_args(["train", "--progressive", "128-0.6"])
    assert "SIZE:UNTIL" in err.getvalue()


def test_old_checkpoint_descriptions_load():
    """Configs and model descriptions written before DataSource / ModelSpec: flat source fields, a top-level
    head_convs, the derived world_size / global_batch / scaled_lr."""
    from vertebra.engine.tasks import ModelSpec

    old = {"task": "det", "data": "/d", "voc_val_split": "val", "head_convs": 2, "detector_kwargs": {"fpn_channels": 8},
           "world_size": 2, "global_batch": 16, "scaled_lr": 0.1, "backbone": "resnet18"}
    cfg = TrainConfig.from_dict(old)
    assert cfg.source == DataSource(data="/d", voc_val_split="val")
    assert cfg.detector_kwargs == {"head_convs": 2, "fpn_channels": 8}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert DataSource.from_dict(old) == DataSource.from_dict(cfg.to_dict()) == cfg.source
    spec = ModelSpec.from_dict({"task": "det", "detector": "retinanet", "backbone": "resnet18", "num_classes": 3,
                                "categories": ["a", "b", "c"], "detector_kwargs": {"min_size": 64},
                                "head_convs": 1, "size": 64})
    assert spec.detector_kwargs == {"head_convs": 1, "min_size": 64}
    assert ModelSpec.from_dict(spec.to_dict()) == spec and "head_convs" not in spec.to_dict()
    assert spec.describe() == "RetinaNet on resnet18 with 3 classes"
    with pytest.raises(ValueError, match="task must be one of"):
        TrainConfig(task="seg").validate()
    with pytest.raises(ValueError, match="give one data source"):
        TrainConfig(source=DataSource(data="/a", voc="/b")).validate()


def _train_argv(shapes, *extra):
    return ["train", "--data", str(shapes), "--backbone", BACKBONE, "--size", str(SIZE), "--batch", "4", "--epochs",
            "1", "--max-steps", "2", "--no-progress", "--detector-kw", "fpn_channels=32", "--head-convs", "1",
            "--device", "cpu", "--threads", "1", *extra]


def test_a_second_run_never_overwrites_the_first(shapes, tmp_path, monkeypatch, capsys):
    """A given --out that holds a run is refused (its files stay byte-identical); the default folder becomes NAME-2,
    as ultralytics does; --exist-ok writes over; --resume continues."""
    out = tmp_path / "run"
    assert _cli(_train_argv(shapes, "--out", str(out))) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _cli(_train_argv(shapes, "--out", str(out), "--seed", "1")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{out}: holds a run already" in err and "--resume" in err and "--name" in err and "--exist-ok" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _cli(_train_argv(shapes, "--out", str(out), "--exist-ok")) == 0
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert _cli(_train_argv(shapes, "--name", "default")) == 0
    assert (tmp_path / "runs" / "default" / "last.safetensors").is_file()
    config = json.loads((tmp_path / "runs" / "default-2" / "config.json").read_text())
    assert config["out"] == str(Path("runs") / "default-2")


def test_old_flag_spellings_warn_and_help_shows_defaults(capsys):
    from vertebra.cli import build_parser

    p = build_parser()
    a = p.parse_args(["train", "--amp"])
    assert a.dtype == "auto" and "--amp is now --dtype auto" in capsys.readouterr().err
    assert p.parse_args(["train", "--amp", "bf16"]).dtype == "bf16"
    a = p.parse_args(["predict", "x.jpg", "--pretrained", "--bf16"])
    assert a.dtype == "bf16" and "--bf16 is now --dtype bf16" in capsys.readouterr().err
    assert p.parse_args(["bench", "--input", "64"]).size == 64
    assert p.parse_args(["bench", "--det-size", "64"]).size == 64
    assert p.parse_args(["export", "resnet18", "--input", "64"]).size == 64
    assert p.parse_args(["info", "resnet18", "--input", "64"]).size == 64
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS training epochs (default 12)" in text and "(default: sgd)" in text
    assert "--amp" not in text  # the old spellings are hidden
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("vertebra ")


def test_every_flag_has_help():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_cli_args import commands

    missing = [(w, a.option_strings) for w, p in commands().items() for a in p._actions
               if a.option_strings and not a.help]
    assert missing == []


def test_config_replays_a_run(shapes, tmp_path):
    assert _cli(_train_argv(shapes, "--out", str(tmp_path / "a"), "--lr", "0.003", "--optimizer", "adamw")) == 0
    # the same settings from the run's config.json, one changed on top
    assert _cli(["train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"),
                 "--lr", "0.002"]) == 0
    a = json.loads((tmp_path / "a" / "config.json").read_text())
    b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert b["lr"] == 0.002 and a["lr"] == 0.003
    same = {k for k in a if k not in ("lr", "out", "scaled_lr")}
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    (tmp_path / "bad.json").write_text("[1]")
    assert _cli(["train", "--config", str(tmp_path / "bad.json")]) == 2


def test_predict_globs_per_image_json_yolo_txt_and_video(shapes, trained, tmp_path, monkeypatch, capsys):
    import sys
    import types

    import numpy as np

    from vertebra.engine.tasks import DetectionTask

    ck = str(trained / "last.safetensors")
    out = tmp_path / "p"
    real = DetectionTask.predict
    box = {"bbox_xyxy": [10.0, 20.0, 58.0, 44.0], "score": 0.9, "label": 2, "category": "triangle", "category_id": 3}
    monkeypatch.setattr(DetectionTask, "predict", lambda self, *a, **k: {"detections": [box]})
    assert _cli(["predict", str(shapes / "val" / "00000[01].jpg"), "--checkpoint", ck, "--out", str(out),
                 "--save-txt", "--device", "cpu"]) == 0
    one = json.loads((out / "000000.json").read_text())
    assert one["image"].endswith("000000.jpg") and one["detections"] == [box] and (out / "000001.json").is_file()
    h, w = one["height"], one["width"]
    assert (out / "labels" / "000000.txt").read_text() == \
        f"2 {34 / w:.6f} {32 / h:.6f} {48 / w:.6f} {24 / h:.6f} 0.9000\n"  # label cx cy w h score, normalised
    monkeypatch.setattr(DetectionTask, "predict", real)
    assert _cli(["predict", str(tmp_path / "*.nothing"), "--checkpoint", ck, "--out", str(out)]) == 2
    # a video without PyAV: skipped with the reason; with a stand-in PyAV: one JSON with its frames
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not decoded by the stand-in")
    capsys.readouterr()
    assert _cli(["predict", str(video), "--checkpoint", ck, "--out", str(tmp_path / "v0")]) == 2
    assert "reading video needs PyAV (pip install av)" in " ".join(capsys.readouterr().err.split())

    class Frame:
        def __init__(self, k):
            self.k = k

        def to_ndarray(self, format):
            return np.full((SIZE, SIZE, 3), 40 * self.k, dtype=np.uint8)

    class Container:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def decode(self, video):
            return (Frame(k) for k in range(3))

    monkeypatch.setitem(sys.modules, "av", types.SimpleNamespace(open=lambda path: Container()))
    assert _cli(["predict", str(video), "--checkpoint", ck, "--out", str(tmp_path / "v"), "--score-thresh",
                 "0"]) == 0
    clip = json.loads((tmp_path / "v" / "clip.json").read_text())
    assert clip["video"] == str(video) and [f["frame"] for f in clip["frames"]] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "v" / "clip").iterdir()) == ["000000.jpg", "000001.jpg", "000002.jpg"]


def test_no_progress_prints_status_lines(shapes, tmp_path, caplog):
    """Without a progress bar a line every 10 log intervals (or minute): step, loss, images/s, ETA."""
    import logging

    with caplog.at_level(logging.INFO, logger="vertebra.engine"):
        Trainer(det_config(shapes, tmp_path / "r", epochs=3, log_every=1, eval_every=100)).fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 1 and lines[0].startswith("step 10/12 (epoch 2.50): loss "), lines
    assert "img/s" in lines[0] and "ETA" in lines[0]


def test_an_unknown_keyword_names_the_closest(shapes, tmp_path, capsys):
    assert _cli(_train_argv(shapes, "--out", str(tmp_path / "r"), "--detector-kw", "fpn_channel=128")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown argument 'fpn_channel'; closest: fpn_channels" in err and "Traceback" not in err, err


def test_weights_not_in_the_cache_offline_is_one_line(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VERTEBRA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VERTEBRA_OFFLINE", "1")
    argv = _train_argv(shapes, "--out", str(tmp_path / "r"), "--pretrained")
    argv[argv.index(BACKBONE)] = "resnet18"
    assert _cli(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is not in the cache and VERTEBRA_OFFLINE is set" in err and "Traceback" not in err, err
