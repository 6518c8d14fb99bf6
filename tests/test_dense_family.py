"""DenseNet, DPN, SENet, Residual Attention Network and PyramidNet beyond the registry-wide test:
DenseNet's memory-efficient option, feature widths, and the pieces that make each paper's
network what it is."""

from __future__ import annotations

import pytest
import torch

import vertebra
from vertebra.backbones.densenet import DenseLayer
from vertebra.backbones.pyramidnet import ZeroPadShortcut
from vertebra.backbones.residual_attention import AttentionModule


def _train_step(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,size", [("densenet_bc_100_12", 32), ("densenet121", 64)])
def test_densenet_memory_efficient_is_identical(name, size):
    torch.manual_seed(0)
    plain = vertebra.create_backbone(name, num_classes=5)
    efficient = vertebra.create_backbone(name, num_classes=5, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    assert efficient.memory_efficient and not plain.memory_efficient
    assert all(m.memory_efficient for m in efficient.modules() if isinstance(m, DenseLayer))
    x = torch.randn(2, 3, size, size)
    out_a, grads_a = _train_step(plain, x)
    out_b, grads_b = _train_step(efficient, x)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    for n, g in grads_a.items():
        torch.testing.assert_close(grads_b[n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # the recomputation in backward must not update BatchNorm's running statistics twice
    sa, sb = plain.state_dict(), efficient.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    plain.eval()
    efficient.eval()
    with torch.no_grad():
        torch.testing.assert_close(efficient(x), plain(x), rtol=0, atol=0)


def test_densenet_memory_efficient_keeps_less_for_backward():
    """The checkpointed dense layers save fewer activations for the backward pass."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)

    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return total

    plain = saved_bytes(vertebra.create_backbone("densenet_bc_100_12"))
    efficient = saved_bytes(vertebra.create_backbone("densenet_bc_100_12", memory_efficient=True))
    assert efficient < 0.7 * plain, (efficient, plain)


@pytest.mark.parametrize("name,size", [("densenet_bc_100_12", 32), ("densenet121", 64)])
def test_densenet_buffer_path_equals_the_concatenations(name, size):
    """Without autograd a dense block writes each layer's channels into one buffer; with it, it concatenates:
    the same values, in both layouts."""
    torch.manual_seed(0)
    model = vertebra.create_backbone(name).eval()
    x = torch.randn(2, 3, size, size, requires_grad=True)
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt)
        with torch.enable_grad():
            listed = model(xi)
        with torch.no_grad():
            buffered = model(xi)
        torch.testing.assert_close(buffered, listed.detach(), rtol=1e-5, atol=1e-6)


def test_densenet_rejects_drop_path():
    with pytest.raises(ValueError, match="no residual branches"):
        vertebra.create_backbone("densenet121", drop_path_rate=0.1)


@pytest.mark.parametrize("name,channels", [
    ("densenet121", [64, 256, 512, 1024, 1024]),
    ("densenet_bc_100_12", [216, 300, 342]),
    ("dpn92", [64, 336, 704, 1552, 2688]),
    ("dpn68", [10, 144, 320, 704, 832]),
    ("senet154", [128, 256, 512, 1024, 2048]),
    ("se_resnext50_32x4d", [64, 256, 512, 1024, 2048]),
    ("attention56", [64, 256, 512, 1024, 2048]),
    ("pyramidnet200_a300", [64, 312, 748, 1400, 1456]),
    ("pyramidnet110_a48", [32, 48, 64]),
])
def test_feature_channels(name, channels):
    with torch.device("meta"):
        model = vertebra.create_backbone(name, features_only=True)
        s = vertebra.backbone_spec(name).input_size[-1]
        feats = model(torch.empty(1, 3, s, s))
    assert [f.channels for f in model.feature_info] == channels
    assert [f.shape[1] for f in feats] == channels


def test_pyramidnet_shortcut_is_zero_padded_identity():
    sc = ZeroPadShortcut(4, 6, stride=2)
    x = torch.randn(1, 4, 8, 8)
    y = sc(x)
    assert y.shape == (1, 6, 4, 4) and not list(sc.parameters())
    torch.testing.assert_close(y[:, :4], torch.nn.functional.avg_pool2d(x, 2))
    assert y[:, 4:].abs().sum() == 0
    # no projection anywhere: every parameter lives in a unit's convolutions/BNs, the stem or the head
    model = vertebra.create_backbone("pyramidnet110_a48")
    assert not any("shortcut" in n for n, _ in model.named_parameters())


def test_attention_residual_learning():
    """H(x) = (1 + M(x)) * T(x): with the mask's last conv zeroed M = 1/2 everywhere."""
    torch.manual_seed(0)
    mod = AttentionModule(16, levels=2).eval()
    torch.nn.init.zeros_(mod.mask_head.conv2.weight)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        pre = mod.pre(x)
        expected = mod.post(1.5 * mod.trunk(pre))
        torch.testing.assert_close(mod(x), expected)
        m = mod.mask(pre)
    assert m.shape == pre.shape
