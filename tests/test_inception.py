"""The Inception line (GoogLeNet ... PolyNet): auxiliary heads, odd feature sizes, minimum
inputs. The registry-wide checks live in test_backbones.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vertebra
from vertebra.backbone import count_params
from vertebra.engine.techniques import aux_loss

NAMES = ["googlenet", "googlenet_tv", "bn_inception", "inception_v2", "inception_v3", "inception_v4",
         "inception_resnet_v1", "inception_resnet_v2", "xception", "polynet"]


def build(name, **kw):
    torch.manual_seed(0)
    return vertebra.create_backbone(name, **kw)


# -- auxiliary classifiers -----------------------------------------------------------------


@pytest.mark.parametrize("name,n_aux,size", [("googlenet", 2, 64), ("googlenet_tv", 2, 64), ("inception_v3", 1, 75)])
def test_aux_heads_train_only(name, n_aux, size):
    x = torch.randn(2, 3, size, size)
    model = build(name, num_classes=5, aux_logits=True).train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 1 + n_aux
    assert all(o.shape == (2, 5) for o in out)
    loss = aux_loss(out, torch.tensor([0, 4]))
    manual = sum(w * F.cross_entropy(o, torch.tensor([0, 4])) for w, o in zip([1.0] + [0.3] * n_aux, out))
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert all(p.grad is not None for p in model.aux_heads.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)  # eval: the logits alone
    # without aux_logits there are no aux heads and train mode returns the logits alone
    plain = build(name, num_classes=5).train()
    assert plain.aux_heads is None and plain(x).shape == (2, 5)
    # features_only drops them
    fo = build(name, aux_logits=True, features_only=True).train()
    assert fo.aux_heads is None and fo.head is None
    feats = fo(x)
    assert isinstance(feats, list) and [f.shape[1] for f in feats] == [i.channels for i in fo.feature_info]


def test_googlenet_aux_heads_load_from_torchvision():
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, transform_input=False).eval()
    ours = build("googlenet_tv", aux_logits=True).eval()
    assert count_params(ours) == count_params(tv)
    vertebra.load_reference_weights(ours, tv.state_dict(), source="torchvision")
    feat = torch.randn(2, 512, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(ours.aux_heads[0](feat), tv.aux1(feat))
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(ours(x), tv(x))
    # a checkpoint with auxiliary weights also loads into a model built without them
    vertebra.load_reference_weights(build("googlenet_tv"), tv.state_dict(), source="torchvision")


def test_inception_v3_aux_head_loads_from_torchvision():
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True,
                                         transform_input=False).eval()
    ours = build("inception_v3", aux_logits=True).eval()
    assert count_params(ours) == count_params(tv) == 27_161_264
    vertebra.load_reference_weights(ours, tv.state_dict(), source="torchvision")
    feat = torch.randn(2, 768, 17, 17)
    x = torch.randn(2, 3, 75, 75)
    with torch.no_grad():
        torch.testing.assert_close(ours.aux_heads[0](feat), tv.AuxLogits(feat))
        torch.testing.assert_close(ours(x), tv(x))


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,size,expected", [
    ("inception_v3", 299, [147, 71, 35, 17, 8]),
    ("inception_v4", 299, [147, 73, 35, 17, 8]),
    ("inception_resnet_v2", 299, [147, 71, 35, 17, 8]),
    ("xception", 299, [147, 74, 37, 19, 10]),
    ("polynet", 331, [163, 81, 39, 19, 9]),
    ("googlenet", 224, [112, 56, 28, 14, 7]),
    ("bn_inception", 224, [112, 56, 28, 14, 7]),
])
def test_odd_feature_sizes_are_kept(name, size, expected):
    with torch.device("meta"):
        model = vertebra.create_backbone(name, features_only=True)
        feats = model(torch.empty(1, 3, size, size))
    assert [f.shape[-1] for f in feats] == expected
    assert model.strides == [2, 4, 8, 16, 32]


@pytest.mark.parametrize("name", NAMES)
def test_min_input_size_runs_and_below_is_refused(name):
    with torch.device("meta"):
        model = vertebra.create_backbone(name, num_classes=3).eval()
        m = model.min_input_size
        assert model(torch.empty(1, 3, m, m)).shape == (1, 3)
        with pytest.raises(ValueError, match=f"at least {m}x{m}"):
            model(torch.empty(1, 3, m - 1, m - 1))
    if m > 32:  # the minimum is tight: one pixel less fails inside the network
        with torch.device("meta"), pytest.raises(RuntimeError):
            model.min_input_size = m - 1
            model(torch.empty(1, 3, m - 1, m - 1))


def test_inception_v3_min_input_is_75():
    assert vertebra.create_backbone("inception_v3").min_input_size == 75


# -- structure -----------------------------------------------------------------------------


def test_non_residual_nets_refuse_drop_path():
    for name in ("googlenet", "bn_inception", "inception_v2", "inception_v3", "inception_v4"):
        with torch.device("meta"), pytest.raises(ValueError, match="drop_path_rate"):
            vertebra.create_backbone(name, drop_path_rate=0.1)
    with torch.device("meta"):
        for name in ("inception_resnet_v1", "inception_resnet_v2", "xception", "polynet"):
            vertebra.create_backbone(name, drop_path_rate=0.2)


def test_inception_resnet_v2_paper_layout():
    with torch.device("meta"):
        model = vertebra.create_backbone("inception_resnet_v2", layout="paper", features_only=True)
        feats = model(torch.empty(1, 3, 299, 299))
    assert [f.shape[1] for f in feats] == [64, 160, 384, 1152, 2144]
    assert [len(model.blocks_a), len(model.blocks_b), len(model.blocks_c)] == [5, 10, 5]


def test_inception_resnet_residual_scales():
    with torch.device("meta"):
        model = vertebra.create_backbone("inception_resnet_v2")
    assert {b.scale for b in model.blocks_a} == {0.17}
    assert {b.scale for b in model.blocks_b} == {0.10}
    assert [b.scale for b in model.blocks_c] == [0.20] * 9 + [1.0]


def test_polynet_modules():
    from vertebra.backbones.polynet import MultiWayModule, PolyModule

    with torch.device("meta"):
        model = vertebra.create_backbone("polynet")
    kinds = [type(m) for m in model.stage_b]
    assert len(model.stage_a) == 10 and all(isinstance(m, MultiWayModule) for m in model.stage_a)
    assert kinds == [PolyModule, MultiWayModule] * 10
    assert [type(m) for m in model.stage_c] == [PolyModule, MultiWayModule] * 5
    scales = [m.scale for s in (model.stage_a, model.stage_b, model.stage_c) for m in s]
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(0.7) and scales == sorted(scales, reverse=True)
    poly = model.stage_b[0]
    # poly-3: the branch convolutions are shared (one per layer), one BN per order
    convs = [m for m in poly.block.modules() if isinstance(m, torch.nn.Conv2d)]
    assert poly.order == 3 and len(convs) == 4 + 3  # 4 shared branch convs + 3 expansions
    assert all(len(layer.bns) == 3 for path in poly.block.paths for layer in path)


def test_polynet_poly3_is_a_polynomial():
    """With BN at identity and scale 1, poly-3 computes x + F(x) + F(rF(x)) + F(rF(rF(x)))."""
    from vertebra.backbones.polynet import _B, PolyModule

    torch.manual_seed(0)
    m = PolyModule(_B, 3, 1.0).eval()
    x = torch.randn(1, 1152, 5, 5)
    with torch.no_grad():
        f1 = m.block(x, 0)
        f2 = m.block(f1.relu(), 1)
        f3 = m.block(f2.relu(), 2)
        torch.testing.assert_close(m(x), (x + f1 + f2 + f3).relu())


def test_inception_resnet_v1_figure_explained():
    """The facts table's 23.995624M (imgclsmob) is the paper's network plus facenet's extras: a 6th
    IR-C block and a 1792-512(no bias)-BN-1000 head in place of the linear classifier."""
    with torch.device("meta"):
        m = vertebra.create_backbone("inception_resnet_v1")
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(m) == 22_756_328
    facenet_head = 1792 * 512 + 2 * 512 + 512 * 1000 + 1000
    assert n(m) - n(m.head) + n(m.blocks_c[0]) + facenet_head == 23_995_624
