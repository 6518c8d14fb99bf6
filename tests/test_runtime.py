"""The onnxruntime backend (vertebra.export.runtime): optimize_for_inference(backend="onnxruntime") gives the PyTorch
model's outputs (a backbone, its feature levels, a RetinaNet's detections), ``predict --backend onnxruntime`` and
``bench --backend``, and a clear refusal where onnxruntime is missing. No test here asserts a time."""

import importlib.util
import json

import pytest
import torch

import vertebra
from vertebra.cli import main
from vertebra.detection import create_detector

pytest.importorskip("onnxruntime")


def _cli(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_backbone_and_its_levels_in_onnxruntime_equal_pytorch():
    torch.manual_seed(0)
    m = vertebra.create_backbone("resnet18", num_classes=10).eval()
    ort = vertebra.optimize_for_inference(m, backend="onnxruntime", example=torch.rand(1, 3, 64, 64), threads=1)
    assert ort.check.ok and "onnxruntime" in repr(ort)
    for x in (torch.rand(1, 3, 64, 64), torch.rand(3, 3, 96, 80)):  # another batch and size: dynamic axes
        with torch.no_grad():
            torch.testing.assert_close(ort(x), m(x), rtol=1e-3, atol=1e-4)
    f = vertebra.create_backbone("mobilenet_v2", features_only=True).eval()
    ort = vertebra.optimize_for_inference(f, backend="onnxruntime", example=torch.rand(1, 3, 64, 64), threads=1)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = f(x)
    got = ort(x)
    assert isinstance(got, list) and len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_retinanet_detections_in_onnxruntime_equal_pytorch():
    torch.manual_seed(0)
    det = create_detector("retinanet", backbone="resnet18", num_classes=3, min_size=128, max_size=128,
                          fpn_channels=32, head_convs=1, score_thresh=0.2, detections_per_img=20).eval()
    with torch.no_grad():  # spread the class scores, so that some clear the threshold and few are tied
        det.net.head.cls_logits.weight.normal_(0, 0.3)
        det.net.head.cls_logits.bias.zero_()
    ort = vertebra.optimize_for_inference(det, backend="onnxruntime", threads=1)
    assert ort.size == 128 and ort.network_check.ok and ort.check.ok
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    with torch.no_grad():
        ref = det(images)
    got = ort(images)
    assert sum(len(r["scores"]) for r in ref) > 0
    for a, b in zip(got, ref):
        assert len(a["scores"]) == len(b["scores"])
        oa, ob = a["scores"].argsort(descending=True), b["scores"].argsort(descending=True)
        torch.testing.assert_close(a["scores"][oa], b["scores"][ob], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(a["boxes"][oa], b["boxes"][ob], rtol=1e-3, atol=1e-2)
        assert torch.equal(a["labels"][oa], b["labels"][ob])
    # an image of another shape is fit into the canvas and its boxes come back in its own pixels
    out = ort([torch.rand(3, 64, 128)])[0]
    assert (out["boxes"][:, 1::2] <= 64).all() and (out["boxes"][:, 0::2] <= 128).all()
    with pytest.raises(ValueError, match="float32"):
        vertebra.optimize_for_inference(det, backend="onnxruntime", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend must be one of"):
        vertebra.optimize_for_inference(det, backend="tensorrt")


def test_missing_onnxruntime_is_one_clear_line(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install vertebra\[onnx\]"):
        vertebra.optimize_for_inference(vertebra.create_backbone("resnet18"), backend="onnxruntime")
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    assert _cli(["predict", str(img), "--pretrained", "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert "argument --backend" in err and "pip install vertebra[onnx]" in err and "Traceback" not in err
    assert _cli(["bench", "resnet18", "--backend", "onnxruntime", "--no-train"]) == 2
    assert "onnxruntime" in capsys.readouterr().err


def test_predict_with_the_onnxruntime_backend_matches_torch(tmp_path):
    from vertebra.data import write_shapes
    from vertebra.data.sources import DataSource
    from vertebra.engine.config import TrainConfig
    from vertebra.engine.train import train

    shapes = write_shapes(tmp_path / "shapes", num_train=8, num_val=2, size=64, seed=1)
    train(TrainConfig(source=DataSource(data=str(shapes)), size=64, backbone="shufflenet_v2_x0_5", batch=4,
                      max_steps=2, final_eval=False, detector_kwargs={"fpn_channels": 16, "head_convs": 1,
                                                                        "score_thresh": 0.0},
                      out=str(tmp_path / "run"), progress=False, threads=1))
    image = str(shapes / "val" / "000000.jpg")
    outs = {}
    for backend in ("torch", "onnxruntime"):
        assert _cli(["predict", image, "--checkpoint", str(tmp_path / "run" / "last.safetensors"), "--device",
                     "cpu", "--score-thresh", "0", "--backend", backend, "--out", str(tmp_path / backend)]) == 0
        outs[backend] = json.loads((tmp_path / backend / "000000.json").read_text())["detections"]
    a, b = outs["torch"], outs["onnxruntime"]
    assert len(a) == len(b) > 0
    assert sorted(d["score"] for d in a) == pytest.approx(sorted(d["score"] for d in b), abs=1e-3)


def test_bench_backend_columns(tmp_path):
    from vertebra.bench.measure import BenchConfig, measure_model

    cfg = BenchConfig(input=64, batch=2, device="cpu", train=False, runs=1, min_seconds=0.0, warmup=0,
                      backends=("onnxruntime",))
    row = measure_model(lambda: vertebra.create_backbone("mobilenet_v2"), (3, 64, 64), cfg, optimize=True)
    assert row["latency_ms_onnxruntime"] > 0 and row["throughput_ips_onnxruntime"] > 0
    from vertebra.bench.report import bench_table

    row.update(name="mobilenet_v2", library="vertebra", status="ok", input="64x64")
    table = bench_table([row], "t")
    assert "lat ms ort" in [c.header for c in table.columns]
