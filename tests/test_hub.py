"""Published weights by name (vertebra.hub, create_backbone(pretrained=...), ``vertebra weights``), no internet:
the loopback server of tests/conftest.py serves a random-init twin's state_dict under the real file's URL, and
the table entry's checksum becomes the served file's."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

import vertebra
from vertebra import hub
from vertebra.cli import main
from vertebra.reference.keymaps import find_keymap
from vertebra.reference.twins import TWIN_BUILD_KWARGS, build_twin, has_timm

pytestmark = pytest.mark.skipif(not has_timm(), reason="the timm twins need timm")


def _twin_state(twin: str, num_classes: int = 1000, seed: int = 0) -> dict:
    """A random twin's state_dict with BatchNorm statistics away from 0/1 (so a wrong pairing shows)."""
    torch.manual_seed(seed)
    model = build_twin(twin, num_classes=num_classes).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model, model.state_dict()


def _file_bytes(w: hub.Weights, sd: dict) -> bytes:
    """The state_dict in the entry's file format: safetensors for timm's hub files, torch.save otherwise."""
    if w.file_name.endswith(".safetensors"):
        return save_safetensors({k: v.contiguous() for k, v in sd.items()})
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _patch_table(monkeypatch, *entries: hub.Weights) -> None:
    """The table with ``entries`` in place of the ones with the same (network, tag)."""
    by_key = {(e.network, e.tag): e for e in entries}
    rows = tuple(by_key.get((r.network, r.tag), r) for r in hub._table())
    monkeypatch.setattr(hub, "_table", lambda: rows)


def _serve(server, monkeypatch, w: hub.Weights, data: bytes, checksum: bool = True) -> hub.Weights:
    digest = server.add(w.url, data)
    patched = dataclasses.replace(w, sha256=digest[:8] if checksum else None)
    _patch_table(monkeypatch, patched)
    return patched


def _served_path(w: hub.Weights) -> str:
    return "/" + w.url.split("://", 1)[1]


# -- the table --------------------------------------------------------------------------------------------------


def test_the_table_is_consistent():
    """Every entry is loadable by construction: a registered network, a twin of it with a key map and the build
    arguments that make it one, one default per network, the source's URL and checksum form."""
    rows = hub.list_weights()
    assert len(rows) > 100
    detectors = {"retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"}
    names = {w.network for w in rows}
    assert detectors <= names
    for net in names:
        assert sum(w.default for w in hub.list_weights(net)) == 1, net
        assert hub.list_weights(net)[0].default and hub.get_weights(net).default
    for w in rows:
        assert w.tag.split(":", 1)[0] == w.twin.split(":", 1)[0] == w.source
        assert len(w.mean) == len(w.std) == w.input_size[0] == 3 and 0 < w.crop_pct <= 1
        assert w.interpolation in ("bilinear", "bicubic", "nearest"), w.interpolation
        if w.network in detectors:
            assert find_keymap("torchvision", "retinanet_resnet50_fpn") is not None and w.categories == "coco"
            continue
        spec = vertebra.backbone_spec(w.network)
        assert w.twin in spec.references or (w.network, w.twin) in TWIN_BUILD_KWARGS, (w.network, w.twin)
        assert w.build_kwargs == TWIN_BUILD_KWARGS.get((w.network, w.twin), {})
        assert find_keymap(w.source, w.network) is not None
        if w.source == "torchvision":
            assert w.url.startswith("https://download.pytorch.org/models/") and w.url.endswith(w.file_name)
            assert re.fullmatch(r"[0-9a-f]{8,}", w.sha256) and w.file_name.rsplit(".", 1)[0].endswith(w.sha256)
            assert w.license == "bsd-3-clause" and w.top1 is not None
        else:
            assert w.sha256 is None  # timm publishes none
            if w.hf_hub_id:
                assert w.url == f"https://huggingface.co/{w.hf_hub_id}/resolve/main/{w.file_name}"
    # the twin's own preprocessing: torchvision's GoogLeNet and Inception-v3 re-normalise to (x - 0.5) / 0.5
    assert hub.get_weights("inception_v3", "torchvision:IMAGENET1K_V1").mean == (0.5, 0.5, 0.5)
    assert hub.get_weights("resnet50", "torchvision:IMAGENET1K_V2").crop_pct == pytest.approx(224 / 232, abs=1e-4)
    # the default is the best set under a license that allows commercial use
    nc = [w for w in hub.list_weights("resnet50") if "nc" in w.license]
    assert nc and not any(w.default for w in nc)


def test_lookups_and_their_errors():
    assert hub.get_weights("resnet50", "torchvision:IMAGENET1K_V2") == hub.get_weights("resnet50", "IMAGENET1K_V2")
    assert hub.get_weights("resnet50", "DEFAULT") == hub.get_weights("resnet50", True) == hub.get_weights("resnet50")
    assert hub.get_weights("resnet50", "timm:a1_in1k").hf_hub_id == "timm/resnet50.a1_in1k"
    with pytest.raises(hub.WeightsError, match="not a tag.*torchvision:IMAGENET1K_V1"):
        hub.get_weights("resnet50", "IMAGENET1K_V9")
    with pytest.raises(hub.WeightsError, match="alexnet has no published weights"):
        hub.get_weights("alexnet")
    with pytest.raises(TypeError, match="pretrained must be True or a tag"):
        hub.get_weights("resnet50", 3)
    assert vertebra.backbone_spec("resnet50").has_weights and not vertebra.backbone_spec("alexnet").has_weights
    assert vertebra.backbone_spec("resnet50").weights[0] == hub.get_weights("resnet50")
    assert vertebra.list_models("vgg1[16]*") == ["vgg11", "vgg11_bn", "vgg16", "vgg16_bn"]
    with_weights = vertebra.list_models(pretrained=True)
    assert "resnet50" in with_weights and "alexnet" not in with_weights and "alexnet_tv" in with_weights
    assert set(with_weights) == {n for n in vertebra.list_backbones() if hub.has_weights(n)}


# -- download, cache, checksum, failure -------------------------------------------------------------------------


def test_pretrained_resnet18_is_the_twins_network(weights_server, monkeypatch, caplog):
    """create_backbone(pretrained=True) takes the network's default, downloads it once, loads it through the key
    map: the twin's outputs; another class count keeps the body and says so; features_only loads the body."""
    w = hub.get_weights("resnet18")
    twin, sd = _twin_state(w.twin)
    w = _serve(weights_server, monkeypatch, w, _file_bytes(w, sd))
    model = vertebra.create_backbone("resnet18", pretrained=True).eval()
    assert model.pretrained_weights == w and hub.is_cached(w)
    assert hub.cached_path(w).is_relative_to(Path(weights_server.root).parent / "home" / "weights")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)
        with caplog.at_level(logging.WARNING, logger="vertebra.hub"):
            ten = vertebra.create_backbone("resnet18", pretrained=True, num_classes=10).eval()
        assert ten.num_classes == 10 and "1000-class classifier" in caplog.text and "10-class" in caplog.text
        torch.testing.assert_close(ten.forward_head(ten.forward_features(x)).shape, torch.Size([2, 10]))
        for a, b in zip(ten.forward_intermediates(x, intermediates_only=True),
                        model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        body = vertebra.create_backbone("resnet18", pretrained=w.tag, features_only=True, out_strides=(8, 16, 32))
        for a, b in zip(body.eval()(x), model.forward_intermediates(x, indices=3, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert weights_server.requests == [_served_path(w)]  # downloaded once, then read from the cache


def test_twin_build_arguments_come_with_the_weights(weights_server, monkeypatch):
    """timm's MobileNet v1 is ours with ReLU6: its weights build the network with act="relu6"."""
    w = hub.get_weights("mobilenet_v1")
    assert w.build_kwargs == {"act": "relu6"}
    twin, sd = _twin_state(w.twin)
    _serve(weights_server, monkeypatch, w, _file_bytes(w, sd))
    model = vertebra.create_backbone("mobilenet_v1", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="act"):
        vertebra.create_backbone("mobilenet_v1", pretrained=True, act="relu")


def test_weights_by_url_and_wrong_arguments(weights_server, monkeypatch, tmp_path):
    twin, sd = _twin_state("torchvision:resnet18")
    url = "https://example.org/models/my-resnet18.pth"
    buf = io.BytesIO()
    torch.save(sd, buf)
    weights_server.add(url, buf.getvalue())
    model = vertebra.create_backbone("resnet18", weights=url).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-5)
    assert hub.url_path(url).is_file()
    with pytest.raises(ValueError, match="not both"):
        vertebra.create_backbone("resnet18", pretrained=True, weights=url)
    with pytest.raises(ValueError, match="3 input channels, not in_chans=1"):
        vertebra.create_backbone("resnet18", pretrained=True, in_chans=1)
    with pytest.raises(hub.WeightsError, match="zfnet has no published weights"):
        vertebra.create_backbone("zfnet", pretrained=True)
    assert len(weights_server.requests) == 1  # the refusals downloaded nothing


def _resnet18_entry(weights_server, monkeypatch, **kw) -> tuple[hub.Weights, bytes]:
    w = hub.get_weights("resnet18", "torchvision:IMAGENET1K_V1")
    _, sd = _twin_state(w.twin)
    data = _file_bytes(w, sd)
    return _serve(weights_server, monkeypatch, w, data, **kw), data


def test_checksum_mismatch_deletes_the_file(weights_server, monkeypatch):
    w, data = _resnet18_entry(weights_server, monkeypatch)
    weights_server.add(w.url, data[:-10] + b"0123456789")  # another file behind the same URL
    with pytest.raises(hub.WeightsError, match=r"checksum mismatch .*resnet18-f37072fd\.pth.*deleted") as e:
        vertebra.create_backbone("resnet18", pretrained="torchvision:IMAGENET1K_V1")
    assert w.sha256 in str(e.value)
    assert not hub.cached_path(w).exists() and not list(hub.cached_path(w).parent.iterdir())


def test_truncated_download_leaves_nothing(weights_server, monkeypatch):
    """A connection that drops mid-transfer: an error naming the URL, no partial file in the cache (with a
    checksum and without one)."""
    for checksum in (True, False):
        w, data = _resnet18_entry(weights_server, monkeypatch, checksum=checksum)
        weights_server.truncate[_served_path(w)] = len(data) // 3
        with pytest.raises(hub.WeightsError, match="resnet18-f37072fd.pth"):
            hub.load_state_dict(w, progress=False)
        assert not hub.cached_path(w).parent.exists() or not list(hub.cached_path(w).parent.iterdir())


def test_offline_and_unreachable_name_the_url_and_the_cache_path(weights_server, monkeypatch):
    w, _ = _resnet18_entry(weights_server, monkeypatch)
    monkeypatch.setenv("VERTEBRA_OFFLINE", "1")
    with pytest.raises(hub.WeightsError) as e:
        vertebra.create_backbone("resnet18", pretrained="IMAGENET1K_V1")
    msg = str(e.value)
    assert "VERTEBRA_OFFLINE" in msg and w.url in msg and str(hub.cached_path(w)) in msg
    assert weights_server.requests == []
    # placed by hand where the message says, the file is used offline
    path = hub.cached_path(w)
    path.parent.mkdir(parents=True)
    path.write_bytes((weights_server.root / _served_path(w).lstrip("/")).read_bytes())
    assert vertebra.create_backbone("resnet18", pretrained="IMAGENET1K_V1").pretrained_weights == w
    path.unlink()
    monkeypatch.delenv("VERTEBRA_OFFLINE")
    monkeypatch.setenv("VERTEBRA_MIRROR", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(hub.WeightsError, match="could not download") as e:
        hub.download(w, progress=False)
    assert w.url in str(e.value) and str(path) in str(e.value)


def test_a_pickle_payload_is_never_run(weights_server, monkeypatch, tmp_path):
    """A file that would run code when unpickled is refused (weights_only), deleted, and its code never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    buf = io.BytesIO()
    torch.save({"conv1.weight": Payload()}, buf)
    w, _ = _resnet18_entry(weights_server, monkeypatch)
    w = _serve(weights_server, monkeypatch, w, buf.getvalue())
    with pytest.raises(hub.WeightsError, match="not a readable torch checkpoint.*deleted"):
        vertebra.create_backbone("resnet18", pretrained="IMAGENET1K_V1")
    assert not marker.exists() and not hub.is_cached(w)


# -- the CLI ----------------------------------------------------------------------------------------------------


def test_weights_commands(weights_server, monkeypatch, capsys):
    w, data = _resnet18_entry(weights_server, monkeypatch)
    assert main(["weights", "list", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "torchvision:IMAGENET1K_V1" in out and "timm:a1_in1k" in out and "69.758" in out
    assert main(["weights", "path", "resnet18", "--tag", "IMAGENET1K_V1"]) == 0
    assert capsys.readouterr().out.strip() == str(hub.cached_path(w))
    assert main(["weights", "download", "resnet18", "--tag", "IMAGENET1K_V1"]) == 0
    assert hub.cached_path(w).read_bytes() == data
    capsys.readouterr()
    assert main(["weights", "list", "resnet18", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    mine = next(r for r in rows if r["tag"] == w.tag)
    assert mine["cached"] is True and mine["top1"] == w.top1 and mine["url"] == w.url
    assert main(["weights", "list"]) == 0  # every network with weights, one line each
    out = capsys.readouterr().out
    assert "retinanet_resnet50_fpn_v2" in out and "inception_v3" in out
    for argv, words in [(["weights", "download", "alexnet"], ["alexnet", "no published weights"]),
                        (["weights", "path", "resnet18", "--tag", "V9"], ["V9", "IMAGENET1K_V1"]),
                        (["weights", "list", "resnet_nope"], ["resnet_nope"])]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(word in err for word in words), err
    assert main(["list", "--family", "ResNet"]) == 0
    out = capsys.readouterr().out
    best = max(x.top1 for x in hub.list_weights("resnet18"))
    assert "weights" in out and f"top-1 {best:.1f}" in out.replace("\n", " ")


# -- training from published weights ----------------------------------------------------------------------------


def test_train_pretrained_fine_tunes_and_says_so(weights_server, monkeypatch, tmp_path):
    """vertebra train --pretrained: the backbone starts from the weights (frozen BN, trainable stages 3, their
    normalisation), config.json records the choice and why; without it the run says it starts from scratch;
    the checkpoint rebuilds without downloading again."""
    from vertebra.data import write_shapes
    from vertebra.engine.models import load_model

    w = hub.get_weights("shufflenet_v2_x0_5")
    twin, sd = _twin_state(w.twin)
    w = _serve(weights_server, monkeypatch, w, _file_bytes(w, sd))
    data = tmp_path / "shapes"
    write_shapes(data, num_train=4, num_val=2, size=64, seed=1)
    common = ["--data", str(data), "--backbone", "shufflenet_v2_x0_5", "--size", "64", "--batch", "2",
              "--max-steps", "1", "--no-progress", "--device", "cpu", "--threads", "1", "--detector-kw",
              "fpn_channels=16", "--head-convs", "1", "--eval-every", "100"]
    assert main(["train", *common, "--pretrained", "--out", str(tmp_path / "ft")]) == 0
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["pretrained"] == "default" and cfg["init"]["mode"] == "fine-tune"
    assert cfg["init"]["weights"] == w.tag and "--pretrained" in cfg["init"]["reason"]
    model, state = load_model(tmp_path / "ft" / "last.safetensors")
    kw = state["model"]["detector_kwargs"]
    assert kw["image_mean"] == list(w.mean) and "frozen_bn" not in kw  # the pretrained setting: frozen BN
    assert type(model.net.backbone.conv1.bn).__name__ != "BatchNorm2d"
    assert len(weights_server.requests) == 1
    # the first stages kept the weights (frozen), as loaded
    body = vertebra.create_backbone("shufflenet_v2_x0_5", pretrained=True, features_only=True)
    torch.testing.assert_close(model.net.backbone.state_dict()["conv1.conv.weight"],
                               body.state_dict()["conv1.conv.weight"])
    # without a weights flag the cached published weights are fine-tuned (the finetune preset, no new download);
    # --scratch trains from random init, and the record says the weights exist
    assert main(["train", *common, "--out", str(tmp_path / "auto")]) == 0
    cfg = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert cfg["init"]["mode"] == "fine-tune" and cfg["preset"] == "finetune" and len(weights_server.requests) == 1
    assert main(["train", *common, "--scratch", "--out", str(tmp_path / "scratch")]) == 0
    init = json.loads((tmp_path / "scratch" / "config.json").read_text())["init"]
    assert init["mode"] == "from-scratch" and "--pretrained fine-tunes them" in init["reason"]
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as e:  # argparse's usage error, before anything is built
        main(["train", *common, "--pretrained", "--backbone-weights", str(tmp_path / "x.pth"), "--out",
              str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()


def test_export_takes_the_weights_normalisation(weights_server, monkeypatch):
    """Exported by name with --pretrained, the model's sidecar information is the weights' mean / std and class
    names (torchvision's Inception-v3 expects (x - 0.5) / 0.5, not ImageNet's statistics)."""
    from vertebra.export import load_for_export

    w, _ = _resnet18_entry(weights_server, monkeypatch)
    model, info = load_for_export("resnet18", pretrained="IMAGENET1K_V1")
    assert info["mean"] == list(w.mean) and info["std"] == list(w.std) and "IMAGENET1K_V1" in info["source"]
    assert len(info["categories"]) == 1000 and info["categories"][0] == "tench"
    _, info = load_for_export("resnet18", pretrained="IMAGENET1K_V1", num_classes=10)
    assert info["categories"] is None and info["mean"] == list(w.mean)
