"""The Winograd convolution of the inference path (layers/winograd.py, FusedConv): the same function as the direct
convolution (float64 to rounding, every padding, sizes that are no multiple of the tile, bias, ReLU, a residual),
float32 rounding bounded, the choice made once per shape and only among what the mode allows, and the switch on
optimize_for_inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vertebra
from vertebra.layers import winograd
from vertebra.layers.fused import FusedConv, set_winograd
from vertebra.layers.winograd import transform_weight, winograd_conv


def _case(n, c, h, w, co, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    k = torch.randn(co, c, 3, 3, generator=g, dtype=dtype) / (3 * c**0.5)
    b = torch.randn(co, generator=g, dtype=dtype)
    r = torch.randn(n, co, h, w, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return x, k, b, r


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("n,c,h,w,co,padding", [
    (1, 3, 8, 8, 5, (1, 1)),      # tiles fit exactly
    (2, 4, 7, 9, 6, (1, 1)),      # the last tile row and column hang over
    (1, 5, 11, 6, 3, (0, 0)),     # no padding: 9 x 4 outputs
    (2, 2, 5, 5, 4, (2, 2)),      # wider padding: 7 x 7
    (1, 3, 3, 3, 2, (1, 0)),      # one tile; padding differs per side
])
def test_equals_the_direct_convolution_in_float64(m, n, c, h, w, co, padding):
    x, k, b, r = _case(n, c, h, w, co)
    u = transform_weight(k, m)
    direct = F.conv2d(x, k, b, 1, padding)
    got = winograd_conv(x, u, m, padding, b)
    assert got.shape == direct.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, direct, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(winograd_conv(x, u, m, padding, None, relu=True), F.relu(direct - b[:, None, None]),
                               rtol=1e-10, atol=1e-10)
    if direct.shape == r.shape:
        torch.testing.assert_close(winograd_conv(x, u, m, padding, b, relu=True, residual=r), F.relu(direct + r),
                                   rtol=1e-10, atol=1e-10)


def test_a_block_of_tile_rows_at_a_time(monkeypatch):
    """Tall inputs are done a block of tile rows at a time; the blocks join without a seam."""
    monkeypatch.setattr(winograd, "_BLOCK_ELEMENTS", 1)  # one tile row per block
    x, k, b, r = _case(2, 3, 13, 10, 4)
    for m in (2, 4):
        torch.testing.assert_close(winograd_conv(x, transform_weight(k, m), m, (1, 1), b, relu=True, residual=r),
                                   F.relu(F.conv2d(x, k, b, 1, 1) + r), rtol=1e-10, atol=1e-10)


def test_float32_rounding():
    """F(2x2) rounds as the direct float32 convolution does (within 2x); F(4x4) within 1e-4 of the output's
    scale."""
    x, k, b, _ = _case(2, 256, 16, 16, 128, dtype=torch.float32)
    exact = F.conv2d(x.double(), k.double(), b.double(), 1, 1)
    scale = float(exact.abs().max())
    direct = float((F.conv2d(x, k, b, 1, 1).double() - exact).abs().max())
    f2 = float((winograd_conv(x, transform_weight(k, 2), 2, (1, 1), b).double() - exact).abs().max())
    f4 = float((winograd_conv(x, transform_weight(k, 4), 4, (1, 1), b).double() - exact).abs().max())
    assert f2 <= 2 * direct + 1e-7 * scale, (f2, direct)
    assert f4 <= 1e-4 * scale, (f4, scale)


def _fused(c=64, co=64, relu=True, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c, co, 3, padding=1)
    return conv, FusedConv(conv, relu=relu).eval()


def test_fused_conv_decides_once_per_shape_and_within_its_mode(monkeypatch):
    timed = []

    def fake_time(fn):  # direct 3, F(2x2) 2, F(4x4) 1 (a Winograd candidate's default argument is m)
        timed.append(fn)
        return {None: 3.0, (2,): 2.0, (4,): 1.0}[fn.__defaults__]

    monkeypatch.setattr(winograd, "_time", fake_time)
    monkeypatch.setattr(winograd, "_CHOICES", {})
    conv, fused = _fused()
    x = torch.randn(1, 64, 12, 12).contiguous(memory_format=torch.channels_last)
    calls = []
    real = winograd.winograd_conv
    monkeypatch.setattr("vertebra.layers.fused.winograd_conv", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    with torch.inference_mode():
        y = fused(x)
        fused(x)
    assert len(timed) == 9 and calls[-1] == 4  # 3 rounds of 3 candidates, once; then F(4x4) as the fastest
    torch.testing.assert_close(y, F.relu(conv(x)), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(winograd, "_CHOICES", {})
    timed.clear()
    fused.winograd = "precise"
    with torch.inference_mode():
        fused(x)
    assert calls[-1] == 2 and len(timed) == 6  # F(4x4) not even timed
    calls.clear()
    fused.winograd = False
    with torch.inference_mode():
        fused(x)
    assert calls == []


def test_fused_conv_keeps_direct_where_winograd_is_not_faster(monkeypatch):
    monkeypatch.setattr(winograd, "_time", lambda fn: 1.0)  # all the same: the direct one stays
    monkeypatch.setattr(winograd, "_CHOICES", {})
    conv, fused = _fused(relu=False)
    x = torch.randn(2, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fused(x)  # decides (timing every candidate once untimed and three times timed)
    calls = []
    monkeypatch.setattr("vertebra.layers.fused.winograd_conv", lambda *a, **k: calls.append(1))
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), conv(x), rtol=1e-4, atol=1e-4)
    assert calls == []


@pytest.mark.parametrize("m", [2, 4])
def test_fused_residual_tail_and_weight_change(monkeypatch, m):
    """``add_relu`` and ``add`` (a pre-activation unit's tail, no ReLU) through Winograd, and a changed weight
    retransformed."""
    monkeypatch.setattr(winograd, "_CHOICES", {})
    monkeypatch.setattr(winograd, "_time", lambda fn: 0.5 if fn.__defaults__ == (m,) else 1.0)
    tiles = []
    real = winograd.winograd_conv
    monkeypatch.setattr("vertebra.layers.fused.winograd_conv", lambda *a, **k: tiles.append(a[2]) or real(*a, **k))
    conv, fused = _fused(relu=False)
    x = torch.randn(2, 64, 10, 10).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 64, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(fused.add_relu(x, r), F.relu(conv(x) + r), rtol=1e-4, atol=1e-4)
        tiles.clear()
        torch.testing.assert_close(fused.add(x, r), conv(x) + r, rtol=1e-4, atol=1e-4)
    assert tiles == [m]
    with torch.no_grad():
        fused.weight.mul_(-2)
        conv.weight.mul_(-2)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), conv(x), rtol=1e-4, atol=1e-4)


def test_optimize_for_inference_switch():
    model = vertebra.create_backbone("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="winograd must be"):
        vertebra.optimize_for_inference(model, winograd="fast")
    for mode in (True, "precise", False):
        fast = vertebra.optimize_for_inference(model, winograd=mode)
        assert {m.winograd for m in fast.modules() if isinstance(m, FusedConv)} == {mode}
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        set_winograd(model, "yes")


# -- training (WinogradConv2d, sent by layers.gemm_conv.TrainingConvs) ---------------------------------------------


@pytest.mark.parametrize("padding", [(1, 1), (0, 0), (2, 1)])
def test_trainable_winograd_equals_conv2d_forward_and_backward(padding):
    from vertebra.layers.winograd import WinogradConv2d

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 11, 9, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 16, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    for t in (x, w, b):
        t.requires_grad_()
    got = WinogradConv2d.apply(x, w, b, padding)
    want = F.conv2d(x, w, b, 1, padding)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, (x, w, b), gy), torch.autograd.grad(want, (x, w, b), gy)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_training_mode_sends_wide_float32_convolutions_to_winograd(monkeypatch):
    from vertebra.layers import gemm_conv
    from vertebra.layers.winograd import WinogradConv2d, winograd_trainable

    conv = torch.nn.Conv2d(128, 128, 3, padding=1)
    wide = torch.randn(2, 128, 64, 64).contiguous(memory_format=torch.channels_last)  # 8192 output pixels
    assert winograd_trainable(wide, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert not winograd_trainable(wide[:, :, :32, :32], conv.weight, (1, 1), (1, 1), (1, 1), 1)  # too few pixels
    assert not winograd_trainable(wide.contiguous(), conv.weight, (1, 1), (1, 1), (1, 1), 1)  # NCHW
    assert not winograd_trainable(wide[:, :64], torch.empty(64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1)  # narrow
    calls = []
    real = WinogradConv2d.apply
    monkeypatch.setattr(gemm_conv.WinogradConv2d, "apply", lambda *a: calls.append(1) or real(*a))
    with gemm_conv.TrainingConvs():
        y = conv(wide)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(wide)  # bf16: oneDNN's
    assert len(calls) == 1
    torch.testing.assert_close(y, F.conv2d(wide, conv.weight, conv.bias, 1, 1), rtol=1e-4, atol=1e-4)
