"""The recipe chosen for the user (engine/presets.py), a run that always ends with its score, the anchors fitted
to the data and ``vertebra data stats``."""

import json
import os
import signal
from pathlib import Path

import pytest

from vertebra.cli import main
from vertebra.data import CocoDetection, write_shapes
from vertebra.data.sources import DataSource
from vertebra.detection.anchors import (
    anchor_coverage,
    box_sample,
    box_statistics,
    fit_anchors,
    scaled_anchor_sizes,
)
from vertebra.engine.checkpoint import load_checkpoint
from vertebra.engine.config import TrainConfig
from vertebra.engine.presets import PRESETS, apply_preset, choose_preset, explicit_fields
from vertebra.engine.train import Trainer

SIZE = 96
BACKBONE = "shufflenet_v2_x0_5"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets") / "shapes"
    write_shapes(root, num_train=16, num_val=6, size=SIZE, seed=5)
    return root


def _cli(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


# --------------------------------------------------------------------------------------------- the preset


def test_preset_follows_how_the_backbone_starts():
    assert choose_preset(TrainConfig(preset="auto")) == "scratch"
    assert choose_preset(TrainConfig(preset="auto", pretrained="default")) == "finetune"
    assert choose_preset(TrainConfig(preset="auto", backbone_weights="w.pth")) == "finetune"
    assert choose_preset(TrainConfig(preset="auto", task="cls")) == "none"
    assert choose_preset(TrainConfig(preset="scratch", pretrained="default")) == "scratch"  # asked for: kept
    with pytest.raises(ValueError, match="preset must be one of"):
        choose_preset(TrainConfig(preset="fast"))
    with pytest.raises(ValueError, match="preset must be one of"):
        TrainConfig(preset="fast").validate()


def test_preset_fills_what_was_not_given_and_records_it():
    cfg = TrainConfig(preset="scratch", lr=5e-4, size=256, max_minutes=10, detector_kwargs={"head_convs": 3})
    out = apply_preset(cfg)
    assert out.preset == "scratch"
    assert out.lr == 5e-4 and "lr" not in out.preset_values  # given: kept
    assert out.optimizer == "adamw" and out.preset_values["optimizer"] == "adamw"
    assert out.ema == pytest.approx(0.995**2, abs=1e-6) and out.channels_last  # 0.995 a step at 8 images
    assert out.progressive == [[128, 0.6], [192, 0.8]]  # half and three quarters of the size
    assert out.schedule_on_time and out.epochs == 10_000  # a time budget runs the schedule over the time
    assert out.detector_kwargs["head_convs"] == 3 and out.detector_kwargs["head_norm"] == "gn"
    assert out.detector_kwargs["anchor_fit"] is True
    assert "head_convs" not in out.preset_values["detector_kwargs"]
    assert apply_preset(out) is out  # applied once: a resumed run or a replayed config is left as it is
    # anchors given by hand are not fitted; no time budget: the epochs and the step schedule stay
    hand = apply_preset(TrainConfig(preset="scratch", detector_kwargs={"anchor_sizes": [[32]] * 5}))
    assert "anchor_fit" not in hand.detector_kwargs and hand.epochs == 12 and not hand.schedule_on_time
    # the preset's fields are TrainConfig's: a renamed field cannot slip through
    fields = set(TrainConfig.__dataclass_fields__)
    for recipe in PRESETS.values():
        assert set(recipe["fields"]) <= fields
    assert apply_preset(TrainConfig(preset="none")).preset_values == {}
    assert explicit_fields(TrainConfig(lr=0.1)) == {"lr"}
    # the batch and the learning rate per image: the preset's batch 16 at 2.5e-4 an image; a given batch keeps the
    # rate per image; a given lr is kept whatever the batch
    assert (out.batch, out.preset_values["batch"]) == (16, 16)
    plain = apply_preset(TrainConfig(preset="scratch"))
    assert plain.batch == 16 and plain.lr == pytest.approx(4e-3) == plain.preset_values["lr"]
    given = apply_preset(TrainConfig(preset="scratch", batch=4))
    assert given.batch == 4 and given.lr == pytest.approx(1e-3) and "batch" not in given.preset_values
    tuned = apply_preset(TrainConfig(preset="finetune", pretrained="default"))
    assert (tuned.batch, tuned.lr, tuned.ema) == (8, pytest.approx(5e-4), pytest.approx(0.995))
    assert apply_preset(TrainConfig(preset="scratch", ema=0.9)).ema == 0.9  # given: kept


def test_cli_preset_flags_override_and_config_json_records(shapes, tmp_path, capsys):
    """No weights flag on a network with published weights: offline they cannot be fetched, so it trains from
    scratch and says why; a flag given (even at its default value) beats the preset; --preset none is the plain
    engine."""
    out = tmp_path / "auto"
    rc = _cli(["train", "--data", str(shapes), "--backbone", "resnet18", "--size", str(SIZE), "--batch", "4",
               "--max-steps", "1", "--no-eval", "--optimizer", "sgd", "--out", str(out), "--no-progress",
               "--threads", "1", "--detector-kw", "fpn_channels=16", "--head-convs", "1"])
    assert rc == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "could not be fetched" in text and "training from scratch" in text and "preset scratch" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "scratch" and cfg["init"]["mode"] == "from-scratch"
    assert cfg["optimizer"] == "sgd" and "optimizer" not in cfg["preset_values"]  # --optimizer sgd was given
    # the preset's learning rate per image times the batch given (--batch 4); the preset's batch is not applied
    assert cfg["preset_values"]["lr"] == pytest.approx(4 * 2.5e-4) and cfg["batch"] == 4
    assert "batch" not in cfg["preset_values"] and cfg["ema"] == pytest.approx(0.995 ** 0.5, abs=1e-6)
    assert cfg["detector_kwargs"]["fpn_channels"] == 16 and cfg["detector_kwargs"]["head_convs"] == 1
    model = load_checkpoint(out / "last.safetensors").state["model"]  # the fitted anchors rebuild the detector
    assert cfg["anchors"]["anchor_sizes"] and model["detector_kwargs"]["anchor_sizes"] == cfg["anchors"]["anchor_sizes"]
    assert "anchor_fit" not in model["detector_kwargs"]
    plain = tmp_path / "plain"
    assert _cli(["train", "--data", str(shapes), "--backbone", BACKBONE, "--size", str(SIZE), "--batch", "4",
                 "--max-steps", "1", "--no-eval", "--preset", "none", "--scratch", "--out", str(plain),
                 "--no-progress", "--threads", "1", "--detector-kw", "fpn_channels=16"]) == 0
    cfg = json.loads((plain / "config.json").read_text())
    assert cfg["preset"] == "none" and cfg["preset_values"] == {} and cfg["optimizer"] == "sgd"
    assert "anchor_sizes" not in cfg["detector_kwargs"]
    capsys.readouterr()
    assert _cli(["train", "--data", str(shapes), "--scratch", "--pretrained"]) == 2
    assert "--scratch" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ a run ends with its score


def _cfg(shapes, out, **kw):
    base = dict(source=DataSource(data=str(shapes)), size=SIZE, backbone=BACKBONE, batch=4, epochs=50,
                optimizer="adamw", lr=1e-3, detector_kwargs={"fpn_channels": 16, "head_convs": 1}, out=str(out),
                progress=False, log_every=1, augment="none", warmup_steps=0, threads=1, ema=0.9)
    base.update(kw)
    return TrainConfig(**base)


def _evals(run: Path):
    import csv

    with (run / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["kind"] == "eval"]


@pytest.mark.parametrize("stop", ["max_steps", "max_minutes"])
def test_a_run_stopped_by_its_budget_ends_with_its_score(shapes, tmp_path, stop):
    kw = {"max_steps": 2} if stop == "max_steps" else {"max_minutes": 1e-4}
    t = Trainer(_cfg(shapes, tmp_path / stop, **kw))
    summary = t.fit()
    t.close()
    assert summary["stop_reason"].startswith("reached")
    assert set(summary["last_eval"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    evals = _evals(tmp_path / stop)
    assert len(evals) == 1 and int(evals[0]["step"]) == summary["steps"]  # once, at the step it stopped
    st = load_checkpoint(tmp_path / stop / "last.safetensors").state
    assert st["last_eval"]["AP50"] == summary["last_eval"]["AP50"] and st["step"] == summary["steps"]
    # --no-eval: no evaluation
    t = Trainer(_cfg(shapes, tmp_path / f"{stop}-no", final_eval=False, **kw))
    summary = t.fit()
    t.close()
    assert summary["last_eval"] == {} and _evals(tmp_path / f"{stop}-no") == []


def test_ctrl_c_stops_after_the_step_saves_and_evaluates(shapes, tmp_path, monkeypatch):
    t = Trainer(_cfg(shapes, tmp_path / "int", val_limit=3))
    assert len(t.val_set) == 3  # val_limit: the first images only
    real = t.train_step

    def step_then_interrupt(batch):
        out = real(batch)
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: caught, the run stops after this step
        return out

    monkeypatch.setattr(t, "train_step", step_then_interrupt)
    summary = t.fit()
    t.close()
    assert summary["stop_reason"].startswith("interrupted") and summary["steps"] == 2
    assert summary["last_eval"] and int(_evals(tmp_path / "int")[-1]["step"]) == 2
    assert load_checkpoint(tmp_path / "int" / "last.safetensors").state["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


# --------------------------------------------------------------------------------------------- anchors and data stats


def _coco(tmp_path, boxes_per_image, size=(100, 100)):
    """A COCO file with known boxes (xywh) and blank images; category ids 7 and 9."""
    from PIL import Image

    img_dir = tmp_path / "img"
    img_dir.mkdir()
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image):
        Image.new("RGB", size).save(img_dir / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size[0], "height": size[1]})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 7 if len(anns) % 2 else 9,
                         "bbox": list(b), "area": b[2] * b[3], "iscrowd": 0})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]}))
    return ann, img_dir


def test_box_statistics_and_coverage_of_known_boxes(tmp_path):
    # image 1: a 20 x 20 box, a 40 x 10 box; image 2: a 60 x 60 box; image 3: none
    ann, img = _coco(tmp_path, [[(6, 6, 20, 20), (50, 50, 40, 10)], [(0, 0, 60, 60)], []])
    ds = CocoDetection(img, ann)
    s = box_sample(ds.records, 100)  # 100 px images at size 100: the scale is 1, padded to 128
    assert s.sizes == [(128, 128)] * 3 and s.num_boxes == 3
    st = box_statistics(s)
    assert st["size"]["p50"] == pytest.approx(20.0)  # sqrt areas 20, 20, 60
    assert st["per_image"]["max"] == 2 and st["per_image"]["mean"] == pytest.approx(1.0)
    assert st["aspect"]["p5"] == pytest.approx(0.25 + 0.1 * 0.75, abs=1e-4)  # h/w = 0.25, 1, 1
    # an anchor equal to a box covers it: 20 x 20 centred at (16, 16) is the 1:1 anchor of size 20 at P3's cell (2, 2)
    # (anchors are centred on x * stride, torchvision's grid)
    one = anchor_coverage(box_sample(ds.records[:1], 100), [[20]], [3], aspect_ratios=(1.0,))
    assert one["covered"] == pytest.approx(0.5)  # the 40 x 10 box is not covered by a square 20
    from vertebra.cli.data import data_stats

    d = data_stats(ds, 100)
    assert d["per_class"] == {"b": 2, "a": 1} or d["per_class"] == {"a": 1, "b": 2}
    assert d["coco_area"]["small"] == pytest.approx(2 / 3) and d["coco_area"]["medium"] == pytest.approx(1 / 3)
    assert d["images"] == 3 and 0.0 <= d["fitted"]["covered"] <= 1.0


def test_fit_anchors_covers_more_than_the_paper_and_takes_p2_only_for_small_objects(shapes, tmp_path):
    ds = CocoDetection(shapes / "train", shapes / "annotations" / "instances_train.json")
    s = box_sample(ds.records, 256)
    fit = fit_anchors(s, min_level=(2, 3))
    assert fit.covered >= fit.paper_covered and fit.covered > 0.5
    assert fit.min_level == 3  # the shapes objects are large enough for P3
    assert fit.anchor_sizes == scaled_anchor_sizes(fit.mult, range(fit.min_level, fit.max_level + 1))
    # tiny boxes (5 px): P3's anchors (stride 8) cannot reach IoU 0.5 on most of them, P2's can
    ann, img = _coco(tmp_path, [[(x, y, 5, 5) for x in range(4, 90, 13) for y in range(4, 90, 17)]])
    tiny = box_sample(CocoDetection(img, ann).records, 100)
    p3 = fit_anchors(tiny, min_level=3)
    both = fit_anchors(tiny, min_level=(2, 3))
    assert both.min_level == 2 and both.covered >= p3.covered + 0.10
    assert fit_anchors(box_sample([], 100)).anchor_sizes  # no boxes: the paper's anchors


def test_data_stats_command(shapes, tmp_path, capsys):
    out = tmp_path / "st.json"
    png = tmp_path / "st.png"
    assert _cli(["data", "stats", "--data", str(shapes), "--size", "96", "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "uncovered at IoU 0.5" in text and "objects per image" in text and "fitted" in text
    st = json.loads(out.read_text())
    assert st["images"] == 16 and st["boxes"]["boxes"] > 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert _cli(["data", "stats", "--data", str(shapes), "--split", "val"]) == 0
    assert _cli(["data", "stats", "--data", str(shapes), "--coco", str(out)]) == 2  # two sources


def test_a_run_stopped_evaluated_and_resumed_ends_as_the_uninterrupted_one(shapes, tmp_path):
    """The final evaluation of a stopped run draws no training randomness, and the resumed moments keep their
    parameters' layout (channels_last): stopping at step 3, evaluating and resuming gives the same weights."""
    from vertebra.engine.train import train

    kw = dict(epochs=2, channels_last=True, augment="flip", ema=None)
    train(_cfg(shapes, tmp_path / "whole", **kw))
    train(_cfg(shapes, tmp_path / "part", max_steps=3, **kw))
    assert _evals(tmp_path / "part")  # it evaluated when it stopped
    train(_cfg(shapes, tmp_path / "part", **kw), resume=True)
    a = load_checkpoint(tmp_path / "whole" / "last.safetensors").tensors("model")
    b = load_checkpoint(tmp_path / "part" / "last.safetensors").tensors("model")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.mark.parametrize("backbone, kwargs", [
    ("squeezenet1_1", {}),  # stride 16 at most: P5 comes from P4
    ("nasnet_a_mobile", {}),  # the NAS cells
    ("inception_v3", {}),  # the stem's odd sizes; the preset's progressive sizes stay above its 75 px minimum
    ("densenet121", {"memory_efficient": True}),  # checkpointed dense layers
])
def test_awkward_backbones_train_under_the_preset(shapes, tmp_path, backbone, kwargs):
    cfg = TrainConfig(source=DataSource(data=str(shapes)), size=SIZE, backbone=backbone, backbone_kwargs=kwargs,
                      preset="scratch", batch=2, max_steps=2, final_eval=False, out=str(tmp_path / "r"),
                      progress=False, threads=1, detector_kwargs={"fpn_channels": 32})
    t = Trainer(cfg)
    assert min(s for s, _ in t.cfg.progressive) >= (75 if backbone == "inception_v3" else 32)
    summary = t.fit()
    t.close()
    assert summary["steps"] == 2
