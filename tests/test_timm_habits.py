"""A timm or torchvision user's habits work unchanged on vertebra's model surface, where the concept is the same.

The script timm's documentation shows, with ``timm`` replaced by ``vertebra``, checked against timm's own results
for the same network (same weights: timm's state_dict loaded through the key map); create_backbone's timm argument
names and its one error for the others; list_models' wildcards; timm and torchvision models under RetinaNet.
"""

from __future__ import annotations

import pytest
import torch

import vertebra
from vertebra.reference.twins import has_timm, in_twin_order

pytestmark = pytest.mark.skipif(not has_timm(), reason="timm is not installed")

# vertebra name -> timm name
PAIRS = {"resnet18": "resnet18", "mobilenet_v2": "mobilenetv2_100"}
# timm's forward_features runs MobileNetV2's 1x1 conv_head (1280 wide); vertebra keeps that conv in the
# classifier head (features_only drops it): its forward_features is the last stage, timm's last intermediate
HEAD_CONV = {"mobilenet_v2"}


def _randomise_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max().clamp_min(1e-6)))


def _pair(name: str):
    """timm's network (BN statistics randomised) and vertebra's with its weights, both in eval mode."""
    import timm

    torch.manual_seed(0)
    theirs = timm.create_model(PAIRS[name], pretrained=False).eval()
    _randomise_bn(theirs)
    ours = vertebra.create_model(name, pretrained=False).eval()
    sd = in_twin_order(dict(theirs.state_dict()), f"timm:{PAIRS[name]}")
    vertebra.load_reference_weights(ours, sd, source="timm")
    return theirs, ours, sd


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_timm_docs_script(name):
    """timm's documented calls on vertebra give timm's shapes, channels, reductions and (same weights) values."""
    import timm

    tname = PAIRS[name]
    theirs, ours, sd = _pair(name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # m = create_model(name); m(x); m.forward_features(x); m.forward_head(...)
        logits, t_final, t_levels = ours(x), *theirs.forward_intermediates(x)
        t_logits = theirs.forward_head(t_final)
        _same(logits, t_logits)
        feats = ours.forward_features(x)
        assert isinstance(feats, torch.Tensor) and feats.dim() == 4 and feats.shape[1] == ours.num_features
        if name in HEAD_CONV:
            _same(feats, t_levels[-1])
            assert ours.head_hidden_size == theirs.num_features == theirs.head_hidden_size
        else:
            _same(feats, t_final)
            assert ours.num_features == theirs.num_features
        _same(ours.forward_head(feats), t_logits)
        _same(ours.forward_head(feats, pre_logits=True), theirs.forward_head(t_final, pre_logits=True))

        # m.forward_intermediates(x): (final, [every stage]); indices, intermediates_only
        final, levels = ours.forward_intermediates(x)
        assert [f.shape for f in levels] == [f.shape for f in t_levels]
        for a, b in zip(levels, t_levels):
            _same(a, b)
        _same(final, t_levels[-1] if name in HEAD_CONV else t_final)
        for indices in (2, [1, -1]):
            a = ours.forward_intermediates(x, indices=indices, intermediates_only=True)
            b = theirs.forward_intermediates(x, indices=indices, intermediates_only=True)
            assert [f.shape for f in a] == [f.shape for f in b], indices
            for u, v in zip(a, b):
                _same(u, v)
        with pytest.raises(IndexError, match="out of range"):
            ours.forward_intermediates(x, indices=[7])

    # m.feature_info of a classifier: every stage, timm's channels and reductions
    t_info = theirs.feature_info
    assert ours.feature_info.channels() == [d["num_chs"] for d in t_info]
    assert ours.feature_info.reduction() == [d["reduction"] for d in t_info]
    assert [f["num_chs"] for f in ours.feature_info] == [d["num_chs"] for d in t_info]

    # create_model(name, features_only=True, out_indices=(2, 3, 4)): timm's levels and feature_info
    fo_t = timm.create_model(tname, features_only=True, out_indices=(2, 3, 4)).eval()
    fo_t.load_state_dict({k: v for k, v in theirs.state_dict().items() if k in fo_t.state_dict()})
    fo = vertebra.create_model(name, features_only=True, out_indices=(2, 3, 4)).eval()
    vertebra.load_reference_weights(fo, sd, source="timm")
    assert fo.feature_info.channels() == fo_t.feature_info.channels()
    assert fo.feature_info.reduction() == fo_t.feature_info.reduction()
    assert fo.feature_info.channels(-1) == fo_t.feature_info.channels(-1)
    # timm's len() and iteration cover every stage, its channels() / reduction() the selected ones; vertebra's
    # feature_info is the selected levels throughout, so zip(fo.feature_info, fo(x)) pairs them
    assert len(fo.feature_info) == len(fo_t.feature_info.channels()) == 3
    with torch.no_grad():
        out, t_out = fo(x), fo_t(x)
    assert isinstance(out, list) and len(out) == len(t_out) == 3
    for info, a, b in zip(fo.feature_info, out, t_out):
        assert a.shape[1] == info.channels and 64 // a.shape[-1] == info.stride
        _same(a, b)
    neg = vertebra.create_model(name, features_only=True, out_indices=(-3, -2, -1))
    assert neg.feature_info == fo.feature_info

    # m.reset_classifier(10); m.get_classifier(); reset_classifier(0)
    for m in (ours, theirs):
        m.reset_classifier(10)
    a, b = ours.get_classifier(), theirs.get_classifier()
    assert (type(a), a.in_features, a.out_features) == (type(b), b.in_features, b.out_features)
    assert ours.num_classes == theirs.num_classes == 10
    with torch.no_grad():
        assert ours.forward_head(feats).shape == theirs.forward_head(t_final).shape == (1, 10)
        for m in (ours, theirs):
            m.reset_classifier(0)
        # the pooled features: the new classifiers are the only difference
        _same(ours.forward_head(feats), theirs.forward_head(t_final))

    # list_models("resnet*") (vertebra's registry: its own names, timm's natural order)
    names = vertebra.list_models(name[:6] + "*")
    assert name in names and all(n.startswith(name[:6]) for n in names)
    assert tname in timm.list_models(tname[:6] + "*")


def test_feature_info_describes_what_the_model_returns():
    model = vertebra.create_backbone("resnet18").eval()
    fo = vertebra.create_backbone("resnet18", features_only=True, out_strides=(16, 8)).eval()
    assert isinstance(fo.feature_info, vertebra.FeatureInfoList)
    assert fo.feature_info.module_name() == ["layer2", "layer3"] and fo.feature_info.reduction() == [8, 16]
    assert fo.feature_info == fo.out_feature_info and len(fo.stage_info) == 5
    assert model.feature_info == model.stage_info and len(model.feature_info) == 5
    assert model.feature_info.channels([0, -1]) == [64, 512] and model.feature_info.reduction(2) == 8
    assert isinstance(model.feature_info[1:3], vertebra.FeatureInfoList)
    assert model.feature_info.get_dicts(idx=0) == {"module": "conv1", "num_chs": 64, "reduction": 2}
    info = model.feature_info[-1]
    assert (info["num_chs"], info["reduction"], info["module"]) == (info.num_chs, info.reduction, info.module)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = fo(x)
        assert [f.shape[1] for f in out] == [i.channels for i in fo.feature_info]  # zip pairs them
        assert fo.forward_levels(x)[0].shape == out[0].shape
        assert fo.forward_features(x).shape == (1, 512, 2, 2)  # the last map, whatever the selection
    with pytest.raises(RuntimeError, match="features_only"):
        fo.reset_classifier(3)


def test_timm_argument_names_and_one_error_for_the_others(tmp_path):
    fo = vertebra.create_backbone("resnet18", features_only=True, out_indices=(1, -1))
    assert fo.feature_info.reduction() == [4, 32]
    with pytest.raises(ValueError, match="out_indices"):
        vertebra.create_backbone("resnet18", features_only=True, out_indices=(5,))
    with pytest.raises(ValueError, match="not both"):
        vertebra.create_backbone("resnet18", out_indices=(1,), out_strides=(4,))
    with pytest.raises(TypeError, match=r"unknown argument 'out_indice'; closest: out_indices"):
        vertebra.create_backbone("resnet18", out_indice=(1, 2))
    with pytest.raises(TypeError, match=r"unknown argument 'drop_rat'; closest: drop_rate"):
        vertebra.create_model("nasnet_a_mobile", drop_rat=0.1)
    with pytest.raises(TypeError, match=r"unknown argument 'fpn_channel'; closest: fpn_channels"):
        vertebra.create_detector("retinanet", backbone="resnet18", fpn_channel=128)
    assert vertebra.create_backbone("resnet18", drop_rate=0.2).head.drop.p == 0.2  # architecture arguments pass
    model = vertebra.create_backbone("resnet18").eval()
    torch.save(model.state_dict(), tmp_path / "own.pth")
    again = vertebra.create_model("resnet18", checkpoint_path=tmp_path / "own.pth").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        vertebra.create_model("resnet18", checkpoint_path=tmp_path / "own.pth", weights=tmp_path / "own.pth")


def test_list_models_wildcards():
    names = vertebra.list_models("resnet*")
    assert names[:4] == ["resnet18", "resnet34", "resnet50", "resnet101"]  # natural order, as timm
    assert set(vertebra.list_models("resnet*", pretrained=True)) <= set(names)
    assert "resnet18" in vertebra.list_models("resnet*", pretrained=True)
    assert vertebra.list_models(["vgg11", "vgg13*"]) == ["vgg11", "vgg13", "vgg13_bn"]
    assert "resnet152_sd" not in vertebra.list_models("resnet*", exclude="*_sd")
    assert vertebra.list_models("no_such_net*") == []


# -- timm and torchvision backbones under RetinaNet ----------------------------------------------------------------


def _images():
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 10.0, 30.0, 45.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[15.0, 15.0, 50.0, 45.0], [2.0, 2.0, 20.0, 20.0]]),
                "labels": torch.tensor([0, 2])}]
    return images, targets


def _train_and_detect(model):
    model.train()
    images, targets = _images()
    losses = model(images, targets)
    assert set(losses) == {"classification", "box_regression"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert isinstance(dets, list) and len(dets) == 2
    assert all(set(d) >= {"boxes", "scores", "labels"} for d in dets)


def _timm_backbone(name):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, features_only=True, pretrained=False)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100"])
def test_timm_backbone_under_retinanet(name):
    """Levels picked by reduction (P3-P5 at 8, 16, 32), trainable_stages per returned level, frozen BN that
    keeps timm's BatchNormAct2d activation (same outputs as the module in eval mode)."""
    body = _timm_backbone(name).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = body(x)
    model = vertebra.create_detector("retinanet", backbone=body, num_classes=3, min_size=64, max_size=64,
                                     fpn_channels=64)
    bb = model.backbone
    assert isinstance(bb, vertebra.detection.BackboneAdapter) and bb.body is body
    assert model.net.backbone_strides == (8, 16, 32)
    assert bb.feature_info.reduction() == [8, 16, 32]
    assert bb.feature_info.channels() == [c for c, r in zip(body.feature_info.channels(),
                                                            body.feature_info.reduction()) if r >= 8]
    assert model.name == f"retinanet_{name}_fpn"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    # trainable_stages=3 of the 5 returned levels: the stem and the stride-4 level are frozen
    frozen = {n for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen and all(p.requires_grad for n, p in body.named_parameters() if n not in frozen)
    body.eval()
    with torch.no_grad():
        after = body(x)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _train_and_detect(model)


def test_timm_convnext_under_retinanet():
    model = vertebra.create_detector("retinanet", backbone=_timm_backbone("convnext_atto"), num_classes=3,
                                     min_size=64, max_size=64, fpn_channels=64)
    assert model.net.backbone_strides == (8, 16, 32) and len(model.net.fpn.extra) == 2
    _train_and_detect(model)


def test_torchvision_feature_extractor_under_retinanet():
    """A torchvision create_feature_extractor model (a dict of levels): strides found by one dummy pass, or
    given as feature_strides; the same detector either way."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    def extractor():
        torch.manual_seed(0)
        return create_feature_extractor(torchvision.models.resnet18(),
                                        return_nodes={"layer4": "c5", "layer2": "c3", "layer3": "c4"})

    model = vertebra.create_detector("retinanet", backbone=extractor(), num_classes=3, min_size=64, max_size=64,
                                     fpn_channels=64)
    bb = model.backbone
    assert bb.stage_info.module_name() == ["c3", "c4", "c5"]  # finest first, whatever the dict's order
    assert bb.feature_info.channels() == [128, 256, 512] and bb.feature_info.reduction() == [8, 16, 32]
    given = vertebra.create_detector("retinanet", backbone=extractor(), num_classes=3, min_size=64,
                                     max_size=64, fpn_channels=64, feature_strides=[8, 16, 32])
    assert given.backbone.stage_info == bb.stage_info
    _train_and_detect(model)


def test_adapter_refuses_a_module_without_levels():
    import torchvision

    with pytest.raises(TypeError, match="features_only=True"):
        vertebra.create_detector("retinanet", backbone=torchvision.models.resnet18(), num_classes=3)
