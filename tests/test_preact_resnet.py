"""Pre-activation ResNet (He et al., ECCV 2016): unit order, the first and last activations,
taps and stochastic depth (agreement with timm's resnetv2_50 is in test_backbones.test_twin_equal)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vertebra
from vertebra.layers import PreActBottleneck


def build(name: str, **kw):
    torch.manual_seed(0)
    return vertebra.create_backbone(name, **kw)


def _randomise_bn(model: nn.Module, positive: bool = False) -> None:
    """Non-trivial BN statistics and affine parameters (init leaves them at 0/1)."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            w = torch.rand(n, generator=g) + 0.5
            m.weight.data.copy_(w if positive else w * torch.randn(n, generator=g).sign())
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def test_unit_is_pre_activation():
    """No ReLU after the addition: a stage's raw output goes negative; every tap (normalised by
    the stage's BN+ReLU) and the final feature (the network's final BN+ReLU) do not."""
    model = build("preact_resnet18").eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 64, 64)
    raw = {}
    hooks = [getattr(model, f"layer{i}").register_forward_hook(lambda m, a, o, i=i: raw.__setitem__(i, o))
             for i in range(1, 5)]
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
    for h in hooks:
        h.remove()
    assert all(raw[i].min() < 0 for i in range(1, 5)), "a pre-activation stage output can be negative"
    assert all(f.min() >= 0 for f in feats)
    # the last feature is exactly the final BN+ReLU of the last stage's raw output
    torch.testing.assert_close(feats[-1], torch.relu(model.norm4(raw[4])), rtol=0, atol=0)
    assert isinstance(model.norm4, nn.BatchNorm2d) and model.norm4.num_features == 512


def test_block_output_can_be_negative_and_is_residual_plus_identity():
    blk = build("preact_resnet50").layer1[1].eval()
    assert isinstance(blk, PreActBottleneck) and blk.shortcut is None
    _randomise_bn(blk)
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        y = blk(x)
        residual = blk.conv3(torch.relu(blk.bn3(blk.conv2(torch.relu(blk.bn2(blk.conv1(torch.relu(blk.bn1(x)))))))))
    assert y.min() < 0
    torch.testing.assert_close(y, x + residual)


def test_no_double_bn_and_each_bn_used_once_per_forward():
    """The stem's BN-ReLU is the first unit's pre-activation (no BN of its own), each stage's
    norm is the next stage's shared pre-activation: every BN runs exactly once per forward."""
    model = build("preact_resnet50").train()
    for i in range(1, 5):
        assert getattr(model, f"layer{i}")[0].bn1 is None
        assert isinstance(getattr(model, f"layer{i}")[1].bn1, nn.BatchNorm2d)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    counts = {n: int(m.num_batches_tracked) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(counts.values()) == {1}, {n: c for n, c in counts.items() if c != 1}
    # 1 stem BN + 3 per bottleneck unit, less one per stage, + 4 stage norms
    assert len(counts) == 1 + 3 * 16 - 4 + 4


def test_cifar_strides_and_stride_in_1x1():
    model = build("preact_resnet164", features_only=True).eval()
    assert model.strides == [1, 2, 4]
    assert [f.channels for f in model.feature_info] == [64, 128, 256]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 32), (16, 16), (8, 8)]
    assert all(f.min() >= 0 for f in feats)
    first = model.layer2[0]
    assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1) and first.shortcut.stride == (2, 2)
    with pytest.raises(ValueError, match="its strides are 1, 2, 4"):
        vertebra.create_backbone("preact_resnet164", features_only=True, out_strides=(8,))
    with pytest.raises(ValueError, match="9n\\+2"):
        vertebra.create_backbone("preact_resnet164", depth=165)


def test_drop_path_linear_rule():
    model = build("preact_resnet164", drop_path_rate=0.2)
    rates = [m.drop_path.p for m in model.modules() if isinstance(m, PreActBottleneck)]
    assert len(rates) == 54
    assert rates[-1] == pytest.approx(0.2) and rates[0] == pytest.approx(0.2 / 54)
    assert all(b > a for a, b in zip(rates, rates[1:]))


def test_features_only_matches_classification_trunk():
    model = build("preact_resnet34").eval()
    fo = build("preact_resnet34", features_only=True, out_strides=(8, 16)).eval()
    fo.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = fo(x), model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in a] == [128, 256]
    torch.testing.assert_close(a[0], b[2], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[3], rtol=0, atol=0)
