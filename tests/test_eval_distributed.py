"""``vertebra eval`` under torchrun: each of 2 processes (gloo on CPU) evaluates its share of the images and the
metrics are those of one process over the whole set (engine.evaluate.eval_process_group + evaluate_dataset,
called by tests/eval_distributed_worker.py as the CLI calls them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_distributed import torchrun

from vertebra.data import write_shapes
from vertebra.data.sources import DataSource
from vertebra.engine.evaluate import eval_process_group, evaluate_dataset
from vertebra.engine.models import load_model
from vertebra.engine.tasks import ModelSpec, task_for

WORKER = Path(__file__).with_name("eval_distributed_worker.py")
SIZE = 96


def _detection_checkpoint(tmp_path: Path, categories: list[str]) -> Path:
    """An untrained RetinaNet on a small backbone saved as a training checkpoint (as tests/test_export.py does);
    score_thresh 0 and 40 boxes per image: every image's detections enter the metrics."""
    from vertebra.detection import create_detector
    from vertebra.engine.checkpoint import save_checkpoint

    kw = {"min_size": SIZE, "max_size": SIZE, "fpn_channels": 32, "head_convs": 1, "score_thresh": 0.0,
          "detections_per_img": 40}
    torch.manual_seed(0)
    model = create_detector("retinanet", backbone="shufflenet_v2_x0_5", num_classes=len(categories), **kw)
    spec = {"task": "det", "detector": "retinanet", "backbone": "shufflenet_v2_x0_5", "num_classes": len(categories),
            "categories": categories, "detector_kwargs": kw, "size": SIZE}
    path = tmp_path / "ckpt" / "last.safetensors"
    save_checkpoint(path, {"model": model.state_dict()}, {"model": spec, "epoch": 1})
    return path


def _one_process(checkpoint: Path, data: Path) -> tuple[dict, int]:
    model, state = load_model(checkpoint)
    spec = ModelSpec.from_dict(state["model"])
    task = task_for(spec.task)
    ds, _ = task.eval_dataset(spec, DataSource(data=str(data)), SIZE)
    with eval_process_group("cpu") as info:  # no torchrun: nothing to join, one process
        assert info.world_size == 1 and info.backend is None
        metrics = evaluate_dataset(task, model, ds, batch_size=4, voc=True, breakdown=True)
    return metrics, len(ds)


def test_two_processes_evaluate_halves_and_equal_one_process(tmp_path):
    data = write_shapes(tmp_path / "shapes", num_train=1, num_val=7, size=SIZE, seed=3)
    categories = json.loads((data / "annotations" / "instances_val.json").read_text())["categories"]
    ckpt = _detection_checkpoint(tmp_path, [c["name"] for c in sorted(categories, key=lambda c: c["id"])])
    single, n = _one_process(ckpt, data)
    torchrun([str(WORKER), str(ckpt), str(data), str(SIZE), str(tmp_path / "out")])
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["distributed"] for r in ranks)
    # every W-th image: 7 images -> 4 on rank 0, 3 on rank 1, none twice, none left out
    assert [r["images"] for r in ranks] == [(n + 1) // 2, n // 2] and n == 7
    keys = [k for k in single if k != "eval_seconds"]
    assert any(single[k] > 0 for k in keys), single  # a comparison of zeros would prove nothing
    for r in ranks:  # every rank returns the metrics of the whole set
        assert sorted(k for k in r["metrics"] if k != "eval_seconds") == sorted(keys)
        for k in keys:
            assert r["metrics"][k] == pytest.approx(single[k], abs=1e-12), (k, r["metrics"], single)
