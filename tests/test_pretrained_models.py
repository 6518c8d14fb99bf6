"""Pretrained models through the public paths, no internet: the COCO RetinaNet (``create_detector(pretrained=)``,
``vertebra predict --pretrained``) and ``vertebra classify``, each loading a random-init torchvision state_dict
served by the loopback weights server (tests/conftest.py) under the real file's URL, with the table entry's
checksum replaced by the served file's."""

from __future__ import annotations

import dataclasses
import functools
import io
import json

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import (
    RetinaNet_ResNet50_FPN_V2_Weights,
    RetinaNet_ResNet50_FPN_Weights,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
)

import vertebra
from vertebra import detection, hub
from vertebra.cli import main
from vertebra.data.transforms import weights_transforms
from vertebra.detection import detector_weights, pretrained_retinanet

V1, V2 = "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"
TORCHVISION_ENUM = {V1: RetinaNet_ResNet50_FPN_Weights.COCO_V1, V2: RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1}
#: the tests' input size (the production path keeps the weights' 800 / 1333: test_settings_are_torchvisions)
SIZE = dict(min_size=320, max_size=533)


def _spread(model: nn.Module, body: nn.Module, g: torch.Generator) -> None:
    """BN statistics and affine away from the identity, so that a layout or load mistake changes the outputs."""
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _torchvision_retinanet(network: str, **kw) -> nn.Module:
    """A random torchvision RetinaNet (91 classes) whose scores spread (the prior bias alone gives 0.01
    everywhere, and ties)."""
    torch.manual_seed(0)
    build = retinanet_resnet50_fpn_v2 if network == V2 else retinanet_resnet50_fpn
    tv = build(weights=None, weights_backbone=None, num_classes=91, **kw)
    g = torch.Generator().manual_seed(1)
    _spread(tv, tv.backbone.body, g)
    with torch.no_grad():
        for m in tv.head.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.03, generator=g)
        tv.head.classification_head.cls_logits.bias.add_(torch.randn(91 * 9, generator=g))
        tv.head.regression_head.bbox_reg.weight.normal_(0, 0.01, generator=g)
    return tv.eval()


def _serve(server, monkeypatch, network: str, tag: str, state_dict) -> hub.Weights:
    """Serve ``state_dict`` as the file of the table's (network, tag) entry; the entry's checksum becomes the
    served file's. Returns the patched entry."""
    w = hub.get_weights(network, tag)
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    patched = dataclasses.replace(w, sha256=server.add(w.url, buf.getvalue()))
    rows = tuple(patched if (r.network, r.tag) == (w.network, w.tag) else r for r in hub.list_weights())
    monkeypatch.setattr(hub, "_table", lambda: rows)
    return patched


@pytest.fixture
def photo(tmp_path):
    """A small generated image, as a PNG file; returns (path, its pixels 3 x H x W in 0..1)."""
    g = torch.Generator().manual_seed(7)
    pixels = (torch.rand(3, 120, 160, generator=g) * 255).round().to(torch.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
    return path, pixels.float() / 255


@pytest.fixture
def small_input(monkeypatch):
    """create_detector(pretrained=...) at the tests' input size (everything else as in production)."""
    monkeypatch.setitem(detection._PRETRAINED, "retinanet", functools.partial(pretrained_retinanet, **SIZE))


def _threshold(scores: torch.Tensor, rank: int = 60) -> float:
    """A score threshold between two well-separated scores near ``rank`` (no detection sits at it)."""
    s = scores.sort(descending=True).values
    gaps = [(float(s[i] - s[i + 1]), i) for i in range(rank // 2, min(rank * 2, len(s) - 1))]
    _, i = max(gaps)
    return float(s[i] + s[i + 1]) / 2


def _same_as_json(entries: list[dict], theirs: dict, thresh: float, categories: list[str]) -> None:
    keep = theirs["scores"] >= thresh
    assert 10 <= int(keep.sum()) < 300  # the comparison is not vacuous, and no detection is cut by the cap
    assert len(entries) == int(keep.sum())
    ours = torch.tensor([d["bbox_xyxy"] for d in entries])
    scores = torch.tensor([d["score"] for d in entries])
    labels = torch.tensor([d["label"] for d in entries])
    assert [d["category"] for d in entries] == [categories[int(i)] for i in labels]
    tb, ts, tl = theirs["boxes"][keep], theirs["scores"][keep], theirs["labels"][keep]
    # the JSON rounds boxes to 2 decimals, scores to 4; equal scores may come out in another order
    d = (ours[:, None] - tb[None]).abs().amax(-1) + 1e3 * (labels[:, None] != tl[None])
    d = d + 1e3 * ((scores[:, None] - ts[None]).abs() > 2e-4)
    assert float(d.min(1).values.max()) < 0.02
    assert float(d.min(0).values.max()) < 0.02


@pytest.mark.parametrize("network, pretrained", [(V2, "coco"), (V1, "retinanet_resnet50_fpn:COCO_V1")])
def test_predict_pretrained_gives_torchvisions_detections(weights_server, monkeypatch, small_input, photo, tmp_path,
                                                          network, pretrained):
    tv = _torchvision_retinanet(network, **SIZE)
    _serve(weights_server, monkeypatch, network, "torchvision:COCO_V1", tv.state_dict())
    path, pixels = photo
    with torch.no_grad():
        theirs = tv([pixels])[0]
    thresh = _threshold(theirs["scores"])
    out = tmp_path / "pred"
    rc = main(["predict", str(path), "--pretrained", pretrained, "--score-thresh", str(thresh), "--out", str(out)])
    assert rc == 0
    assert weights_server.requests == [f"/{hub.get_weights(network).url.split('://', 1)[1]}"]
    (entry,) = json.loads((out / "predictions.json").read_text())
    assert (entry["height"], entry["width"]) == tuple(pixels.shape[1:])
    categories = TORCHVISION_ENUM[network].meta["categories"]
    _same_as_json(entry["detections"], theirs, thresh, categories)
    assert Image.open(entry["output"]).size == (160, 120)  # the picture with the named boxes


@pytest.mark.parametrize("network", [V2, V1])
def test_settings_are_torchvisions(weights_server, monkeypatch, network):
    """Built by name, the detector has torchvision's settings for those weights, their class names and entry."""
    tv = _torchvision_retinanet(network)
    w = _serve(weights_server, monkeypatch, network, "torchvision:COCO_V1", tv.state_dict())
    model = vertebra.create_detector("retinanet", backbone="resnet50",
                                     pretrained="coco" if network == V2 else network)
    assert model.pretrained_weights == w
    assert model.categories == TORCHVISION_ENUM[network].meta["categories"]
    assert model.num_classes == len(model.categories) == 91
    t, p = model.transform, model.postprocess
    assert (t.min_size, t.max_size, t.size_divisible) == (tv.transform.min_size, tv.transform.max_size,
                                                          tv.transform.size_divisible)
    assert t.image_mean.flatten().tolist() == pytest.approx(tv.transform.image_mean)
    assert t.image_std.flatten().tolist() == pytest.approx(tv.transform.image_std)
    assert (p.score_thresh, p.nms_thresh, p.detections_per_img, p.topk_candidates) == (
        tv.score_thresh, tv.nms_thresh, tv.detections_per_img, tv.topk_candidates)
    assert model.box_loss == ("giou" if network == V2 else "l1")
    with torch.no_grad():  # the weights are torchvision's: the head outputs agree on a (small) batch
        x = torch.rand(1, 3, 128, 128)
        ours = model.eval().net(x)  # built in train mode, as torchvision's (the v2's BatchNorm is not frozen)
        feats = list(tv.backbone(x).values())
        head = tv.head(feats)
    torch.testing.assert_close(ours[0], head["cls_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[1], head["bbox_regression"], rtol=1e-4, atol=1e-4)


def test_detector_weights_spelling_and_errors(photo, capsys):
    """"coco" takes the COCO set with the highest box AP for the backbone; names pick one; what does not exist
    is an error that lists what does (no download: the choice is made from the table)."""
    rows = [w for w in hub.list_weights() if w.network in (V1, V2)]
    best = max(rows, key=lambda w: w.metrics["box_ap"])
    assert detector_weights("resnet50", "coco") == detector_weights("resnet50", True) == best
    assert best.network == V2  # torchvision's v2 reports the higher box AP
    assert detector_weights("resnet50", V1).network == V1
    assert detector_weights("resnet50", f"{V1}:COCO_V1") == hub.get_weights(V1, "torchvision:COCO_V1")
    assert detector_weights("resnet50", f"{V2}:torchvision:COCO_V1").network == V2
    with pytest.raises(hub.WeightsError, match="resnet18.*retinanet_resnet50_fpn"):
        detector_weights("resnet18", "coco")
    with pytest.raises(hub.WeightsError, match="not 'resnet18'"):
        detector_weights("resnet18", V1)
    with pytest.raises(hub.WeightsError, match="retinanet_resnet50_fpn_v2:COCO_V1"):
        detector_weights("resnet50", "imagenet")
    with pytest.raises(hub.WeightsError, match="91 classes, not 80.*retinanet_resnet50_fpn"):
        vertebra.create_detector("retinanet", backbone="resnet50", num_classes=80, pretrained="coco")
    assert main(["predict", str(photo[0]), "--pretrained", "--backbone", "resnet18"]) == 2
    err = capsys.readouterr().err.strip()
    assert "resnet18" in err and V1 in err


def _torchvision_resnet18() -> nn.Module:
    torch.manual_seed(0)
    tv = resnet18(weights=None)
    _spread(tv, tv, torch.Generator().manual_seed(2))
    return tv.eval()


def _printed_top(out: str) -> list[list[str]]:
    """The class names ``vertebra classify`` printed, per image."""
    images, current = [], None
    for line in out.splitlines():
        if line.startswith("  ") and current is not None:
            rank, rest = line.strip().split(". ", 1)
            current.append(rest.rsplit("(label", 1)[0].rsplit(None, 1)[0].strip())
        elif line.endswith(".png"):
            current = []
            images.append(current)
    return images


def test_classify_prints_torchvisions_top5(weights_server, monkeypatch, photo, tmp_path, capsys):
    tv = _torchvision_resnet18()
    w = _serve(weights_server, monkeypatch, "resnet18", "torchvision:IMAGENET1K_V1", tv.state_dict())
    path, pixels = photo
    from torchvision.models import ResNet18_Weights

    x = weights_transforms(w)(pixels)
    torch.testing.assert_close(x, ResNet18_Weights.IMAGENET1K_V1.transforms()(pixels), rtol=0, atol=0)
    with torch.no_grad():
        top = torch.softmax(tv(x[None]), 1)[0].topk(5)
    names = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    expected = [names[int(i)] for i in top.indices]
    other = tmp_path / "folder"
    other.mkdir()
    (other / "b.png").write_bytes(path.read_bytes())
    assert main(["classify", str(path), str(other), "--backbone", "resnet18", "--pretrained",
                 "torchvision:IMAGENET1K_V1"]) == 0
    out = capsys.readouterr().out
    assert _printed_top(out) == [expected, expected]
    assert f"{float(top.values[0]):.4f}" in out

    # errors: one line, exit 2 (the weights are cached now: no second request)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for argv, words in [([str(tmp_path / "missing.jpg")], ["missing.jpg", "not found"]),
                        ([str(bad)], ["corrupt.png"]),
                        ([str(path), "--backbone", "resnet_nope"], ["resnet_nope"])]:
        args = ["classify", *argv] + ([] if "--backbone" in argv else ["--backbone", "resnet18", "--pretrained",
                                                                        "torchvision:IMAGENET1K_V1"])
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(word in err for word in words), err
    assert len(weights_server.requests) == 1
    nothing = next(n for n in vertebra.list_backbones() if not hub.has_weights(n))
    assert main(["classify", str(path), "--backbone", nothing]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and nothing in err
