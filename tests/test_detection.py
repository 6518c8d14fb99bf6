"""RetinaNet (vertebra.detection): parity with torchvision, training, odd backbones, empty targets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection._utils import Matcher
from torchvision.ops import FrozenBatchNorm2d, box_iou, sigmoid_focal_loss

import vertebra
from vertebra.backbone import Backbone
from vertebra.detection import create_detector
from vertebra.detection.anchors import AnchorGenerator, default_anchor_sizes
from vertebra.detection.boxes import match_anchors, match_anchors_atss, pad_targets
from vertebra.detection.losses import focal_loss_dense
from vertebra.detection.retinanet import Postprocess
from vertebra.precision import cpu_bf16_supported

K = 7
SMALL = dict(min_size=256, max_size=256, score_thresh=0.02, detections_per_img=50)


def _tv_frozen_bn(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            f = FrozenBatchNorm2d(child.num_features, child.eps)
            with torch.no_grad():
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(f, k).copy_(getattr(child, k))
            setattr(module, name, f)
        else:
            _tv_frozen_bn(child)


@pytest.fixture(scope="module")
def pair():
    """A random torchvision retinanet_resnet50_fpn (frozen BN, random BN statistics, livelier head)
    and vertebra's, loaded with its state_dict."""
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K, **SMALL)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tv.backbone.body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        # spread the scores (the prior bias alone gives 0.01 everywhere, and exact ties)
        for m in tv.head.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.03, generator=g)
        tv.head.classification_head.cls_logits.bias.add_(torch.randn(K * 9, generator=g))
        tv.head.regression_head.bbox_reg.weight.normal_(0, 0.01, generator=g)
    _tv_frozen_bn(tv.backbone.body)
    vt = create_detector("retinanet", backbone="resnet50", num_classes=K, p6_from="p5", frozen_bn=True, **SMALL)
    assert vt.name == "retinanet_resnet50_fpn"
    vertebra.load_reference_weights(vt, tv.state_dict(), source="torchvision")
    assert sum(p.numel() for p in vt.parameters()) == sum(p.numel() for p in tv.parameters())
    images = [torch.rand(3, 200, 240, generator=g), torch.rand(3, 256, 180, generator=g)]
    return tv.eval(), vt.eval(), images


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _same_detections(ours: dict, theirs: dict, atol: float = 1e-3, rtol: float = 1e-5) -> None:
    assert ours["boxes"].shape == theirs["boxes"].shape
    torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=rtol, atol=1e-6)
    if len(ours["boxes"]) == 0:
        return
    # equal scores may come out in another order: pair every detection with its nearest twin
    d = (ours["boxes"][:, None] - theirs["boxes"][None]).abs().amax(-1)
    d = d + 1e3 * (ours["labels"][:, None] != theirs["labels"][None])
    assert float(d.min(1).values.max()) < atol
    assert float(d.min(0).values.max()) < atol


def test_parity_network_and_anchors(pair):
    tv, vt, images = pair
    with torch.no_grad():
        il, _ = tv.transform(images)
        feats = list(tv.backbone(il.tensors).values())
        ho = tv.head(feats)
        anchors_tv = tv.anchor_generator(il, feats)
        batch, _ = vt.transform(images)
        assert batch.image_sizes == il.image_sizes
        torch.testing.assert_close(batch.tensor, il.tensors, rtol=0, atol=0)
        levels = vt.net.pyramid(batch.tensor)
        assert [tuple(f.shape) for f in levels] == [tuple(f.shape) for f in feats]
        for a, b in zip(levels, feats):
            assert _rel(a, b) < 1e-5
        cls, box = vt.net(batch.tensor)
        assert _rel(cls, ho["cls_logits"]) < 1e-5
        assert _rel(box, ho["bbox_regression"]) < 1e-5
        anchors, per_level = vt.anchors_for(batch.tensor, levels)
        assert sum(per_level) == anchors.shape[0]
        for a in anchors_tv:
            torch.testing.assert_close(anchors, a, rtol=0, atol=0)


def test_parity_detections(pair):
    tv, vt, images = pair
    with torch.no_grad():
        ours, theirs = vt(images), tv(images)
        assert len(ours) == 2
        assert sum(len(d["boxes"]) for d in theirs) > 20  # the comparison is not vacuous
        for o, t in zip(ours, theirs):
            _same_detections(o, t)
        # a batch tensor gives what a list of the same images gives
        same = torch.stack([images[0][:, :, :180], images[1][:, :200, :]])
        for o, t in zip(vt(same), tv(list(same))):
            _same_detections(o, t)


def test_parity_losses(pair):
    tv, vt, images = pair
    targets = [{"boxes": torch.tensor([[10.0, 20, 100, 120], [50, 50, 60, 70], [0, 0, 239, 199]]),
                "labels": torch.tensor([1, 3, 6])},
               {"boxes": torch.tensor([[30.0, 40, 90, 200]]), "labels": torch.tensor([2])}]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    tv.train(), vt.train()
    try:
        for tg in (targets, [targets[0], empty]):
            lt, lv = tv(images, copy.deepcopy(tg)), vt(images, copy.deepcopy(tg))
            torch.testing.assert_close(lv["classification"], lt["classification"], rtol=2e-5, atol=1e-6)
            torch.testing.assert_close(lv["box_regression"], lt["bbox_regression"], rtol=2e-5, atol=1e-6)
    finally:
        tv.eval(), vt.eval()


def test_postprocess_matches_torchvision_batched(pair):
    """Same head outputs (random, many candidates: the top-k per level binds) -> same detections."""
    tv, _, _ = pair
    g = torch.Generator().manual_seed(3)
    sizes = [(256, 192), (224, 256)]
    feat_sizes = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    n = sum(h * w * 9 for h, w in feat_sizes)
    cls = torch.randn(2, n, K, generator=g) * 2 - 3
    box = torch.randn(2, n, 4, generator=g) * 0.2
    gen = AnchorGenerator(default_anchor_sizes(range(3, 8)))
    anchors = gen((256, 256), feat_sizes)
    per = [h * w * 9 for h, w in feat_sizes]
    old = (tv.score_thresh, tv.topk_candidates, tv.detections_per_img)
    tv.score_thresh, tv.topk_candidates, tv.detections_per_img = 0.05, 100, 60
    try:
        split = {"cls_logits": list(cls.split(per, 1)), "bbox_regression": list(box.split(per, 1))}
        theirs = tv.postprocess_detections(split, [list(anchors.split(per))] * 2, sizes)
    finally:
        tv.score_thresh, tv.topk_candidates, tv.detections_per_img = old
    post = Postprocess(score_thresh=0.05, nms_thresh=0.5, detections_per_img=60, topk_candidates=100)
    ours = post(cls, box, anchors, per, sizes)
    assert all(len(t["boxes"]) == 60 for t in theirs)
    for o, t in zip(ours, theirs):
        _same_detections(o, t)


def test_focal_loss_and_matching_match_torchvision():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 50, 4, generator=g) * 3).requires_grad_(True)
    target = torch.zeros(2, 50, 4)
    bi, ni, ki = torch.tensor([0, 0, 1]), torch.tensor([3, 7, 9]), torch.tensor([1, 2, 0])
    target[bi, ni, ki] = 1.0
    w = torch.rand(2, 50, generator=g)
    ref = (sigmoid_focal_loss(logits, target, reduction="none") * w[..., None]).sum()
    (gref,) = torch.autograd.grad(ref, logits)
    ours = focal_loss_dense(logits, w, (bi, ni, ki), w[bi, ni])
    (gours,) = torch.autograd.grad(ours, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gours, gref)

    anchors = AnchorGenerator(default_anchor_sizes(range(3, 6)))((128, 128), [(16, 16), (8, 8), (4, 4)])
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 70], [70, 20, 120, 60], [5, 5, 7, 6]]),
                "labels": torch.tensor([0, 1, 2])},
               {"boxes": torch.tensor([[0.0, 0, 128, 128]]), "labels": torch.tensor([1])}]
    boxes, labels, valid = pad_targets(targets)
    ours = match_anchors(boxes, valid, anchors)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for i, t in enumerate(targets):
        torch.testing.assert_close(ours[i], matcher(box_iou(t["boxes"], anchors)))


def _atss_reference(gt: torch.Tensor, anchors: torch.Tensor, per_level: list[int], topk: int) -> torch.Tensor:
    """ATSS (1912.02424, Algorithm 1) box by box and level by level, for one image."""
    n = anchors.shape[0]
    assigned_iou = torch.full((n,), -1.0)
    out = torch.full((n,), -1, dtype=torch.int64)
    if gt.shape[0] == 0:
        return out
    iou = box_iou(gt, anchors)
    ac = (anchors[:, :2] + anchors[:, 2:]) / 2
    for g in range(gt.shape[0]):
        gc = (gt[g, :2] + gt[g, 2:]) / 2
        cand, start = [], 0
        for count in per_level:
            d = ((ac[start:start + count] - gc) ** 2).sum(1)
            cand += (d.argsort(stable=True)[:topk] + start).tolist()
            start += count
        c = torch.tensor(cand)
        thr = iou[g, c].mean() + iou[g, c].std()
        pos = [i for i in cand if iou[g, i] >= thr and bool((ac[i] > gt[g, :2]).all() and (ac[i] < gt[g, 2:]).all())]
        if not pos:  # the low-quality fallback: the best anchor of the box
            pos = [int(iou[g].argmax())]
        for i in pos:
            if iou[g, i] > assigned_iou[i]:
                assigned_iou[i], out[i] = iou[g, i], g
    return out


def test_atss_matching_equals_the_papers_algorithm():
    sizes = [[12, 15, 19], [24, 30, 38], [48, 60, 76]]
    feats = [(16, 16), (8, 8), (4, 4)]
    anchors = AnchorGenerator(sizes)((128, 128), feats)
    per_level = [h * w * 9 for h, w in feats]
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(6, 2, generator=g) * 100
    wh = torch.exp(torch.rand(6, 2, generator=g) * 3.0 + 1.5)  # 4.5 to 90 px
    boxes = torch.cat([xy, (xy + wh).clamp(max=128)], 1)
    targets = [{"boxes": boxes[:4], "labels": torch.tensor([0, 1, 2, 0])},
               # 9 x 8 px with a cell centre inside; 5 x 5 px between the centres (the fallback)
               {"boxes": torch.tensor([[35.0, 36, 44, 44], [49, 49, 54, 54]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    gt, _, valid = pad_targets(targets)
    ours = match_anchors_atss(gt, valid, anchors, per_level, topk=9)
    for i, t in enumerate(targets):
        torch.testing.assert_close(ours[i], _atss_reference(t["boxes"], anchors, per_level, 9))
    assert bool((ours[2] == -1).all())  # no boxes: all background, nothing ignored
    # the tiny box gets several positives where the 0.5 IoU rule gives it its best anchor only
    iou_rule = match_anchors(gt, valid, anchors)
    assert int((ours[1] == 0).sum()) > int((iou_rule[1] == 0).sum()) >= 1
    assert int((ours[1] == 1).sum()) >= 1  # every box gets a positive
    assert not bool((ours == -2).any())


def test_atss_detector_trains_and_checks_its_arguments():
    torch.manual_seed(0)
    model = _resnet18_detector(frozen_bn=False, trainable_stages=5, matcher="atss", box_loss="giou",
                               head_norm="gn").train()
    images, targets = _synthetic()
    losses = model(images, targets)
    assert all(bool(torch.isfinite(v)) and float(v) > 0 for v in losses.values())
    sum(losses.values()).backward()
    # the engine's call: the same losses under a bf16 autocast (only the network in bf16, the losses
    # float32) and at another size (progressive resizing)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images, targets)
    for k in losses:
        assert low[k].dtype == torch.float32
        torch.testing.assert_close(low[k], losses[k], rtol=0.05, atol=0.05)
    small = model(images, targets, size=96)
    assert all(bool(torch.isfinite(v)) for v in small.values())
    assert any(abs(float(small[k]) - float(losses[k])) > 1e-6 for k in losses)
    with pytest.raises(ValueError, match="matcher must be"):
        _resnet18_detector(matcher="hungarian")
    with pytest.raises(ValueError, match="atss_topk"):
        _resnet18_detector(matcher="atss", atss_topk=0)


def _resnet18_detector(**kw):
    return create_detector("retinanet", backbone="resnet18", num_classes=3, min_size=128, max_size=128, **kw)


def _synthetic(n_boxes: bool = True):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 128, 128, generator=g) * 0.2
    images[0, :, 20:70, 30:90] += 0.7
    images[1, 0, 60:120, 10:50] += 0.7
    targets = [{"boxes": torch.tensor([[30.0, 20, 90, 70]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 60, 50, 120]]), "labels": torch.tensor([2])}]
    return images, targets


def test_training_loss_falls():
    torch.manual_seed(0)
    model = _resnet18_detector(frozen_bn=False, trainable_stages=5).train()
    images, targets = _synthetic()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    history = []
    for _ in range(6):
        losses = model(images, targets)
        loss = losses["classification"] + losses["box_regression"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    assert all(v == v for v in history)
    assert history[-1] < 0.95 * history[0] and min(history[-2:]) < min(history[:2]), history


def test_empty_targets_and_eval_contract():
    torch.manual_seed(0)
    model = _resnet18_detector().train()
    images, targets = _synthetic()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, [empty, empty])
    assert float(losses["box_regression"].detach()) == 0.0
    assert torch.isfinite(losses["classification"]) and float(losses["classification"].detach()) > 0
    (losses["classification"] + losses["box_regression"]).backward()
    losses = model(images, [targets[0], empty])
    assert float(losses["box_regression"].detach()) > 0
    with pytest.raises(ValueError, match="positive width"):
        model(images, [{"boxes": torch.tensor([[5.0, 5, 5, 9]]), "labels": torch.tensor([0])}, empty])
    with pytest.raises(ValueError, match="labels must be in"):
        model(images, [{"boxes": torch.tensor([[5.0, 5, 9, 9]]), "labels": torch.tensor([3])}, empty])
    model.eval()
    model.postprocess.score_thresh = 0.01
    with torch.no_grad():
        out = model([images[0], images[1, :, :100, :]])
    assert len(out) == 2
    for d, (h, w) in zip(out, [(128, 128), (100, 128)]):
        assert set(d) == {"boxes", "scores", "labels"}
        assert d["boxes"].shape[1] == 4 and d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0]
        assert d["labels"].dtype == torch.int64
        assert 0 < len(d["boxes"]) <= 300
        assert float(d["boxes"][:, 2].max()) <= w + 1e-3 and float(d["boxes"][:, 3].max()) <= h + 1e-3


def test_frozen_bn_stages_and_fuse():
    model = _resnet18_detector(score_thresh=0.0).eval()
    bb = model.net.backbone
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    frozen = {n.split(".")[0] for n, p in bb.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in bb.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trainable == {"layer2", "layer3", "layer4"}
    assert all(p.requires_grad for p in model.net.head.parameters())
    with torch.no_grad():
        images, _ = _synthetic()
        ref = model(images)
        fused = copy.deepcopy(model).prepare_inference()
        for o, r in zip(fused(images), ref):
            _same_detections(o, r, atol=1e-2, rtol=1e-4)
    unfrozen = _resnet18_detector(frozen_bn=False, trainable_stages=5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in unfrozen.net.backbone.modules())
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_optimize_for_inference_fuses_the_heads_and_keeps_the_outputs():
    from vertebra.layers.fused import FusedConv, onednn_available

    torch.manual_seed(0)
    model = _resnet18_detector(score_thresh=0.0).eval()
    with torch.no_grad():
        for m in model.net.head.modules():  # livelier heads than the prior init
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.03)
    fast = vertebra.optimize_for_inference(model)
    towers = [blk[0] for t in (fast.net.head.cls_tower, fast.net.head.box_tower) for blk in t]
    assert all(isinstance(c, FusedConv) and c.relu for c in towers)
    assert fast.net.head.cls_logits.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.modules())
    images, _ = _synthetic()
    with torch.no_grad():
        x, _ = model.transform(images)
        c0, b0 = model.net(x.tensor)
        c1, b1 = fast.net(x.tensor)
        torch.testing.assert_close(c1, c0, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(b1, b0, atol=2e-4, rtol=1e-4)
        # boxes: the regression tolerance above (2e-4 on the log-size offsets) times the box size (up to the
        # 128 px image), twice for margin
        box_tol = 2 * 2e-4 * images.shape[-1]
        for o, r in zip(fast(images), model(images)):
            _same_detections(o, r, atol=box_tol, rtol=1e-4)
    if onednn_available():
        assert towers[0]._onednn(x.tensor)


@pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no bfloat16 convolutions (test_engine checks "
                                                     "the error that says so)")
def test_optimize_for_inference_in_bfloat16_keeps_the_detections():
    torch.manual_seed(0)
    model = _resnet18_detector(score_thresh=0.0, detections_per_img=50).eval()
    with torch.no_grad():  # livelier class scores; the box subnet keeps its init (boxes near their anchors)
        for m in [*model.net.head.cls_tower.modules(), model.net.head.cls_logits]:
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.03)
    fast = vertebra.optimize_for_inference(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in fast.net.parameters())
    assert fast.transform.image_mean.dtype == fast.transform.image_std.dtype == torch.float32
    images, _ = _synthetic()
    with torch.no_grad():
        x, _ = model.transform(images)
        c0, b0 = model.net(x.tensor)
        c1, b1 = fast.net(x.tensor)  # the float32 batch is cast inside the network
        assert c1.dtype == torch.bfloat16
        assert float((c1.float() - c0).abs().max()) < 0.05 * float(c0.abs().max())
        assert float((b1.float() - b0).abs().max()) < 0.05 * float(b0.abs().max())
        for o, r in zip(fast(images), model(images)):
            # postprocessed in float32; the best detections are the same boxes up to bf16 rounding (where
            # two overlapping candidates score within that rounding, NMS may keep the other one)
            assert o["boxes"].dtype == torch.float32 and o["scores"].dtype == torch.float32
            assert len(o["boxes"]) == len(r["boxes"]) == 50
            iou = box_iou(r["boxes"][:10], o["boxes"])
            same = (iou > 0.95) & (r["labels"][:10, None] == o["labels"][None])
            assert int(same.any(1).sum()) >= 8, iou.max(1).values
            torch.testing.assert_close(o["scores"][:10], r["scores"][:10], atol=2e-2, rtol=0)


class _Stride16(Backbone):
    """ResNet-18 cut after layer3: deepest stride 16."""

    def __init__(self):
        super().__init__()
        r = vertebra.create_backbone("resnet18", features_only=True)
        self.conv1, self.maxpool, self.layer1, self.layer2, self.layer3 = (r.conv1, r.maxpool, r.layer1, r.layer2,
                                                                           r.layer3)
        self.stage_info = r.stage_info[:4]

    def stages(self, x):
        x = self.conv1(x)
        yield x
        x = self.layer1(self.maxpool(x))
        yield x
        x = self.layer2(x)
        yield x
        yield self.layer3(x)


@pytest.mark.parametrize("p6_from", ["p5", "c5"])
def test_stride16_backbone_gets_extra_levels(p6_from):
    model = create_detector("retinanet", backbone=_Stride16(), num_classes=3, min_size=128, max_size=128,
                            p6_from=p6_from, fpn_channels=64)
    assert model.net.backbone_strides == (8, 16)
    assert len(model.net.fpn.extra) == 3  # P5, P6, P7
    # P6 from P5 takes the FPN width (64); from C5 the backbone's last stage (256 channels)
    assert model.net.fpn.extra[0].in_channels == (64 if p6_from == "p5" else 256)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        levels = model.net.pyramid(model.transform(x)[0].tensor)
    assert [tuple(f.shape[-2:]) for f in levels] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    model.train()
    images, targets = _synthetic()
    losses = model(images, targets)
    assert torch.isfinite(losses["classification"]) and torch.isfinite(losses["box_regression"])


def test_unreachable_stride_is_a_clear_error():
    with pytest.raises(ValueError, match=r"resnet110_sd cannot reach stride 8.*1, 2, 4"):
        create_detector("retinanet", backbone="resnet110_sd", num_classes=3)


def test_anchor_options_and_cache():
    model = _resnet18_detector(min_level=2, max_level=6, aspect_ratios=(0.5, 1.0, 2.0, 3.0))
    assert model.net.backbone_strides == (4, 8, 16, 32)
    assert model.anchor_generator.sizes[0] == (16, 20, 25)
    assert model.net.head.num_anchors == 12
    a1, per = model.anchors_for(torch.zeros(1, 3, 128, 128), [torch.zeros(1, 1, 32, 32)] + [torch.zeros(1, 1, s, s)
                                                                                           for s in (16, 8, 4, 2)])
    a2, _ = model.anchors_for(torch.zeros(1, 3, 128, 128), [torch.zeros(1, 1, s, s) for s in (32, 16, 8, 4, 2)])
    assert a1 is a2 and a1.shape == (sum(per), 4) and per[0] == 32 * 32 * 12
    custom = _resnet18_detector(anchor_sizes=((24,), (48,), (96,), (192,), (384,)), head_norm="gn")
    assert custom.net.head.num_anchors == 3
    assert any(isinstance(m, nn.GroupNorm) for m in custom.net.head.modules())
    assert custom.net.head.cls_tower[0][0].bias is None
    with pytest.raises(ValueError, match="anchor_sizes"):
        _resnet18_detector(anchor_sizes=((32,), (64,)))


def test_network_exports():
    model = _resnet18_detector().eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        cls, box = model.net(x)
        ep = torch.export.export(model.net, (x,))
        cls2, box2 = ep.module()(x)
    assert cls.shape == (1, (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1) * 9, 3) and box.shape[-1] == 4
    torch.testing.assert_close(cls2, cls)
    torch.testing.assert_close(box2, box)


def test_parity_v2_layout():
    """retinanet_resnet50_fpn_v2: GroupNorm head, P6 from C5, GIoU box loss, trainable BN."""
    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    torch.manual_seed(0)
    kw = dict(min_size=160, max_size=160)
    tv = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=K, **kw)
    vt = create_detector("retinanet", backbone="resnet50", num_classes=K, p6_from="c5", head_norm="gn",
                         box_loss="giou", frozen_bn=False, trainable_stages=5, **kw)
    vertebra.load_reference_weights(vt, tv.state_dict(), source="torchvision")
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 160, 128, generator=g), torch.rand(3, 160, 128, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 20, 100, 120]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    lt, lv = tv(images, copy.deepcopy(targets)), vt(images, copy.deepcopy(targets))
    torch.testing.assert_close(lv["classification"], lt["classification"], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(lv["box_regression"], lt["bbox_regression"], rtol=2e-5, atol=1e-6)


def test_preprocess_size_override_scales_images_boxes_and_max_size():
    from vertebra.detection.transform import Preprocess

    pre = Preprocess(min_size=256, max_size=400).train()
    images = torch.rand(2, 3, 200, 300)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 110.0, 180.0]]), "labels": torch.tensor([1])}] * 2
    full, t_full = pre(images, targets)
    half, t_half = pre(images, targets, size=128)  # max_size follows: 400 * 128 / 256 = 200
    assert full.image_sizes == [(256, 384)] * 2 and half.image_sizes == [(128, 192)] * 2
    assert half.tensor.shape[-2:] == (128, 192)  # already a multiple of 32
    torch.testing.assert_close(t_half[0]["boxes"], t_full[0]["boxes"] / 2)
    capped, _ = pre(torch.rand(1, 3, 100, 400), size=128)  # the longer side is capped at the scaled 200
    assert capped.image_sizes == [(50, 200)]
    assert half.original_sizes == [(200, 300)] * 2


@pytest.mark.parametrize("thresh", [0.05, 0.0])
def test_postprocess_candidates_equal_a_whole_tensor_search(thresh):
    # the candidates come from a max over the classes first; they must be those (and in the order) of a
    # nonzero over every (image, anchor, class), an image with no candidate included
    g = torch.Generator().manual_seed(1)
    b, n, k = 3, 500, 7
    cls = torch.randn(b, n, k, generator=g) * 2 - 5
    cls[1] = -20.0  # image 1: no score above 0.05
    box = torch.randn(b, n, 4, generator=g) * 0.1
    anchors = torch.rand(n, 2, generator=g).mul(100).repeat(1, 2) + torch.tensor([0.0, 0.0, 20.0, 20.0])
    post = Postprocess(score_thresh=thresh, topk_candidates=10**6)
    boxes, scores, labels, img = post.candidates(cls, box, anchors, [n], torch.tensor([[128, 128]] * b))
    keep = torch.sigmoid(cls) > thresh
    bi, ai, ki = keep.nonzero(as_tuple=True)
    assert torch.equal(img, bi) and torch.equal(labels, ki)
    torch.testing.assert_close(scores, torch.sigmoid(cls[bi, ai, ki]), rtol=0, atol=0)
    assert (thresh > 0) == (int((img == 1).sum()) == 0)
    assert len(boxes) == len(bi)
