"""Deployment: every backbone exports to ONNX and agrees with PyTorch under onnxruntime; RetinaNet
exports with its decoding and NMS and gives the same detections; torch.export; optimize_for_inference.

The registry-wide test uses each network's smallest input, 10 classes and the TorchScript-based
exporter into memory. Before export the BatchNorm statistics are calibrated on a random batch and
the BN scales drawn from [0.5, 1] (batch statistics of 8 random images; so that zero-initialised residual
branches are exercised and the logits have a scale of order one rather than ~0); the check is
max |ORT - PyTorch| <= 1e-4 x scale, or, where PyTorch's own float32 result is that far from its float64
result (ill-conditioned random deep nets), onnxruntime at most twice as far from the float64 result as
PyTorch's float32.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import vertebra
from vertebra import export as E
from vertebra.export import backbone as export_backbone
from vertebra.inference import optimize_for_inference
from vertebra.precision import cpu_bf16_supported

ort = pytest.importorskip("onnxruntime")

#: networks that cannot be exported to ONNX, with the reason (each entry is an expected failure)
NOT_EXPORTABLE: dict[str, str] = {}

#: the biggest / deepest networks (100M+ parameters or 1000 layers): still run by default
SLOW = {"amoebanet_a_large", "nasnet_a_large", "pnasnet5_large", "polynet", "senet154", "preact_resnet1001",
        "pyramidnet200_a450", "pyramidnet272_a200_bottleneck", "wide_resnet101_2", "dpn107", "dpn131",
        "resnext101_64x4d", "pyramidnet110_a270", "pyramidnet200_a300"}


def _params():
    out = []
    for name in vertebra.list_backbones():
        marks = []
        if name in SLOW:
            marks.append(pytest.mark.slow)
        if name in NOT_EXPORTABLE:
            marks.append(pytest.mark.xfail(reason=NOT_EXPORTABLE[name], strict=True))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def calibrate(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """BatchNorm running statistics from one train-mode pass over ``x``; BN scales in [0.5, 1], shifts ~0.1."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with torch.no_grad():
        for m in bns:
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics
        model.train()
        model(x)
    for m in bns:
        m.momentum = 0.1
        # a channel that barely varies on the random batch would amplify rounding by up to 1/sqrt(eps) in eval
        # mode on another input: floor the variance at a tenth of the layer's mean
        m.running_var.clamp_(min=float(m.running_var.mean()) * 0.1 + 1e-3)
    return model.eval()


def _max_rel(onnx_out: np.ndarray, ref: torch.Tensor) -> tuple[float, float]:
    r = ref.numpy()
    assert np.isfinite(r).all(), "PyTorch output is not finite"
    return float(np.abs(onnx_out - r).max()), float(np.abs(r).max())


@pytest.fixture
def one_thread():
    """One thread for PyTorch: the inputs are tiny and export is serial; spare threads only spin on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", _params())
def test_backbone_onnx_matches_pytorch(name, one_thread):
    torch.manual_seed(0)
    model = vertebra.create_backbone(name, num_classes=10)
    size = max(model.min_input_size, 32)
    g = torch.Generator().manual_seed(0)
    calibrate(model, torch.randn(8, model.in_chans, size, size, generator=g))
    x = torch.randn(2, model.in_chans, size, size, generator=g)
    buf = io.BytesIO()
    E.export_onnx(model, buf, x, opset=17)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    diff, scale = _max_rel(out, ref)
    assert scale > 1e-6, f"degenerate logits (scale {scale:.3g}): the check would prove nothing"
    if diff > 1e-4 * scale:
        # Deep random networks can be ill-conditioned enough that float32 rounding alone moves the logits by
        # ~1e-4 (e.g. DPN-131: PyTorch fp32 is 1e-3 off its own fp64 result at the last stage, onnxruntime
        # 5e-4). Then the export is judged against the float64 result: onnxruntime must be as close to it
        # as PyTorch's float32 is.
        with torch.no_grad():
            ref64 = copy.deepcopy(model).double()(x.double()).float().numpy()
        err32 = float(np.abs(ref.numpy() - ref64).max())
        err_ort = float(np.abs(out - ref64).max())
        assert err_ort <= 2 * err32 + 1e-4 * scale, (
            f"{name}: max abs diff {diff:.3g} at output scale {scale:.3g}; vs float64: onnxruntime {err_ort:.3g}, "
            f"PyTorch float32 {err32:.3g}")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "alexnet"])
def test_features_only_dynamic_shapes(name):
    """features_only, dynamic batch and image size: checked at a second batch and a second size."""
    model = vertebra.create_backbone(name, features_only=True)
    size = max(model.min_input_size, 64)
    x = torch.randn(2, 3, size, size)
    calibrate(model, x)
    data = E.export_onnx(model, None, x, dynamic_batch=True, dynamic_size=True)
    inputs = E.sample_inputs(x, True, True, model.min_input_size)
    res = E.check_onnx(model, data, inputs)
    assert res.ok, str(res)
    assert len(res.details) == len(inputs) * len(model.out_feature_info)


def test_export_program_backbone(tmp_path):
    model = calibrate(vertebra.create_backbone("resnet18", num_classes=10), torch.randn(2, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    out = tmp_path / "r18.pt2"
    E.export_program(model, out, x, dynamic_batch=True)
    res = E.check_program(model, out, [x, torch.randn(3, 3, 64, 64)])
    assert res.ok, str(res)
    assert not list(tmp_path.glob(".*tmp*"))


def test_onnx_adaptive_pool_replacement_is_exact():
    pool = nn.AdaptiveAvgPool2d((6, 6))
    for h, w in ((1, 1), (3, 5), (13, 13), (12, 18)):
        x = torch.randn(2, 4, h, w)
        torch.testing.assert_close(export_backbone._AdaptiveAvgPoolExport((6, 6))(x), pool(x))


# -- RetinaNet -------------------------------------------------------------------------------------------------------
def _detector(backbone: str, size: int):
    from vertebra.detection import create_detector

    torch.manual_seed(0)
    model = create_detector("retinanet", backbone=backbone, num_classes=3, min_size=size, max_size=size,
                            detections_per_img=50).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a head that fires and depends on the image (a fresh head scores every anchor ~0.01)
        for m in model.net.head.cls_tower.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
        model.net.head.cls_logits.weight.normal_(0, 0.05, generator=g)
        model.net.head.cls_logits.bias.fill_(-2.0)
    return model


def _mixed_batch(model, size):
    """Three images; the score threshold is set between the best scores of the two lowest-scoring ones,
    so that one image (returned: its index) has no detection and the others have some."""
    batch, sizes, _ = E.sample_detection_batch(size, n=3, seed=3)
    head = model.net.head
    with torch.no_grad():
        cls, _ = model.net(batch)
        head.cls_logits.weight.div_(float((cls + 2.0).std()))  # logits ~ N(-2, 1): some anchors above, most below
        cls, _ = model.net(batch)
    best = torch.sigmoid(cls).flatten(1).max(1).values
    low = best.sort().values
    assert float(low[1] - low[0]) > 1e-4, f"the sample images score too alike for a mixed batch: {best.tolist()}"
    model.postprocess.score_thresh = float((low[0] + low[1]) / 2)
    return batch, sizes, int(best.argmin())


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_retinanet_onnx_same_detections(backbone, tmp_path):
    size = 128
    model = _detector(backbone, size)
    batch, sizes, empty = _mixed_batch(model, size)
    out = tmp_path / "det.onnx"
    E.export_retinanet_onnx(model, out, size)
    refs = E.reference_detections(model, batch, sizes)
    counts = [len(r["scores"]) for r in refs]
    assert counts[empty] == 0 and sum(c > 0 for c in counts) == 2, counts
    res = E.check_retinanet_onnx(model, out, batch, sizes)
    assert res.ok, str(res)
    # the empty image alone (batch of one): empty outputs, not an error
    res1 = E.check_retinanet_onnx(model, out, batch[empty:empty + 1], sizes[empty:empty + 1])
    assert res1.ok and "0 detections" in res1.details[0], str(res1)


def test_retinanet_export_program(tmp_path):
    size = 128
    model = _detector("resnet18", size)
    batch, sizes, _ = _mixed_batch(model, size)
    out = tmp_path / "det.pt2"
    E.export_retinanet_program(model, out, size)
    res = E.check_retinanet_program(model, out, batch, sizes)
    assert res.ok, str(res)


def test_preprocess_for_export():
    ims = [torch.rand(3, 60, 100), torch.rand(3, 128, 64)]
    batch, sizes, scales = E.preprocess_for_export(ims, 128)
    assert batch.shape == (2, 3, 128, 128)
    assert sizes.tolist() == [[76, 128], [128, 64]]
    torch.testing.assert_close(scales, torch.tensor([1.28, 1.0]))
    assert float(batch[0, :, 76:].abs().max()) == 0.0 and float(batch[1, :, :, 64:].abs().max()) == 0.0
    with pytest.raises(ValueError, match="multiple of 32"):
        E.preprocess_for_export(ims, 100)


# -- the inference path ----------------------------------------------------------------------------------------------
def test_packed_weights_follow_the_weights():
    """The oneDNN / MKL copies of the weights (packed on first use) are rebuilt after an in-place change of a
    weight: the optimised model then computes with the new weights, as its plain-ops float64 copy does."""
    import copy

    from vertebra.layers.fused import FusedConv, FusedLinear

    fast = optimize_for_inference(vertebra.create_backbone("resnet18", num_classes=10).eval())
    assert any(isinstance(m, FusedConv) for m in fast.modules()) and isinstance(fast.head.fc, FusedLinear)
    x = torch.randn(4, 3, 64, 64)  # 4 rows: the linear layer packs its weight too
    with torch.inference_mode():
        before = fast(x)
    with torch.no_grad():
        for p in fast.parameters():
            p.mul_(1.5)
    with torch.inference_mode():
        after = fast(x)
        want = copy.deepcopy(fast).double()(x.double()).float()
    assert (after - before).abs().max() > 0.1 * before.abs().max()
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_optimized_model_exports_without_fused_ops(name, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    model = calibrate(vertebra.create_backbone(name, num_classes=10), x)
    fast = optimize_for_inference(model)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4 * float(model(x).abs().max()))
    data = E.export_onnx(fast, None, x)
    import onnx

    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load_from_string(data).graph.node), ops
    assert E.check_onnx(model, data, [x]).ok
    ep = E.export_program(fast, None, x)
    assert "mkldnn" not in str(ep.graph)


@pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no bfloat16 convolutions (test_engine checks "
                                                     "the error that says so)")
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_optimized_model_in_bfloat16(name):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    model = calibrate(vertebra.create_backbone(name, num_classes=10), x)
    fast = optimize_for_inference(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    with torch.no_grad():
        ref, out = model(x), fast(x)  # a float32 input is cast on the way in, the output comes back float32
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # bf16 keeps about 3 significant digits per op; over 20-50 layers the logits agree to a few per cent of
    # their scale (measured 2-6 %) and point the same way
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())
    assert float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)) > 0.998
    with pytest.raises(ValueError, match="dtype"):
        optimize_for_inference(model, dtype=torch.int8)


# -- the command -----------------------------------------------------------------------------------------------------
def _cli(*args):
    from vertebra.cli import main

    return main(["export", *args])


def test_cli_export_backbone_check(tmp_path, capsys):
    out = tmp_path / "sq"
    rc = _cli("squeezenet1_1", "--out", str(out), "--format", "both", "--input", "64", "--dynamic-batch",
              "--check", "--num-classes", "5")
    text = capsys.readouterr().out
    assert rc == 0, text
    assert (tmp_path / "sq.onnx").is_file() and (tmp_path / "sq.pt2").is_file()
    meta = json.loads((tmp_path / "sq.json").read_text())
    assert meta["outputs"] == ["logits"] and meta["input"] == [3, 64, 64]
    assert "check onnx: OK" in text and "check pt2: OK" in text


def test_cli_check_fails_above_tolerance(tmp_path, capsys):
    rc = _cli("squeezenet1_1", "--out", str(tmp_path / "sq"), "--input", "64", "--check", "--rtol", "0",
              "--atol", "0", "--num-classes", "5")
    assert rc == 1 or "max abs difference 0 " in capsys.readouterr().out


def _checkpoint(tmp_path, spec: dict, model) -> str:
    from vertebra.engine.checkpoint import save_checkpoint

    path = tmp_path / "ckpt" / "last.safetensors"
    save_checkpoint(path, {"model": model.state_dict()}, {"model": spec, "epoch": 1})
    return str(path)


def test_cli_export_classifier_checkpoint(tmp_path, capsys):
    spec = {"task": "cls", "backbone": "squeezenet1_1", "num_classes": 4, "categories": ["a", "b", "c", "d"]}
    model = vertebra.create_backbone("squeezenet1_1", num_classes=4)
    rc = _cli(_checkpoint(tmp_path, spec, model), "--input", "64", "--out", str(tmp_path / "cls"), "--check")
    text = capsys.readouterr().out
    assert rc == 0 and "check onnx: OK" in text, text
    assert json.loads((tmp_path / "cls.json").read_text())["categories"] == ["a", "b", "c", "d"]


def test_cli_export_retinanet_checkpoint(tmp_path, capsys):
    """A trained RetinaNet checkpoint: ONNX with NMS, checked, and the preprocessing sidecar."""
    from vertebra.detection import create_detector

    kw = {"min_size": 96, "max_size": 96}
    spec = {"task": "det", "backbone": "resnet18", "num_classes": 3, "detector_kwargs": kw,
            "categories": ["x", "y", "z"]}
    model = create_detector("retinanet", backbone="resnet18", num_classes=3, **kw)
    rc = _cli(_checkpoint(tmp_path, spec, model), "--out", str(tmp_path / "det"), "--check")
    text = capsys.readouterr().out
    assert rc == 0, text
    side = json.loads((tmp_path / "det.json").read_text())
    assert side["size"] == [96, 96] and side["pad_multiple"] == 32 and len(side["mean"]) == 3
    assert side["categories"] == ["x", "y", "z"]
    assert "check onnx: OK" in text


def test_cli_entry_point_has_export():
    from vertebra.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "export" in sub.choices
    r = subprocess.run([sys.executable, "-m", "vertebra", "export", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--check" in r.stdout
