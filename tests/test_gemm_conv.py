"""The training-time GEMM convolution (layers/gemm_conv.py): the rule that admits a convolution, forward and
backward equal to F.conv2d's (float64 exactly up to rounding; bf16 under autocast as autocast's convolution), the
mode that routes only admitted calls where autograd records, and a detector's training step with and without it."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from vertebra.layers.gemm_conv import TrainingConvs, gemm_conv2d, training_convs, weight_bound


def _inputs(n, ci, h, co, k, dtype=torch.float64, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, h + 1, generator=g, dtype=dtype)
    w = torch.randn(co, ci, k, k, generator=g, dtype=dtype) / (ci * k * k) ** 0.5
    b = torch.randn(co, generator=g, dtype=dtype)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("n,ci,h,co,k,stride,padding,bias,channels_last", [
    (2, 8, 5, 6, 3, 1, 1, True, True),
    (3, 5, 7, 4, 3, 2, 1, False, True),
    (1, 4, 6, 3, 1, 1, 0, True, False),
    (2, 3, 9, 5, 5, 2, 2, True, False),
    (2, 6, 4, 7, 3, 1, 0, False, True),
    (1, 2, 8, 3, 3, (2, 1), (1, 0), True, True),
])
def test_forward_and_backward_equal_conv2d(n, ci, h, co, k, stride, padding, bias, channels_last):
    x, w, b = _inputs(n, ci, h, co, k, channels_last=channels_last)
    b = b if bias else None
    want = F.conv2d(x, w, b, stride, padding)
    got = gemm_conv2d(x, w, b, stride, padding)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [t for t in (x, w, b) if t is not None], g)
    got_grads = torch.autograd.grad(got, [t for t in (x, w, b) if t is not None], g)
    for a, e in zip(got_grads, want_grads):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_an_inplace_relu_may_follow():
    """The output is the Function's own tensor, not a view of it: an in-place ReLU after it (a frozen-BN backbone
    whose BatchNorm is folded away) is allowed and differentiates as the plain convolution's."""
    x, w, b = _inputs(2, 8, 5, 6, 3)
    g = torch.randn(2, 6, 5, 6, dtype=torch.float64)
    got = torch.autograd.grad(F.relu(gemm_conv2d(x, w, b, 1, 1), inplace=True), (x, w, b), g)
    want = torch.autograd.grad(F.relu(F.conv2d(x, w, b, 1, 1)), (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_gradients_pass_gradcheck():
    x, w, b = _inputs(2, 3, 4, 2, 3)
    assert torch.autograd.gradcheck(lambda x, w, b: gemm_conv2d(x, w, b, 2, 1), (x, w, b))


def test_under_autocast_it_computes_as_autocasts_convolution():
    x, w, b = _inputs(2, 16, 6, 24, 3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.conv2d(x, w, b, 1, 1)
        got = gemm_conv2d(x, w, b, 1, 1)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    gx, gw, gb = torch.autograd.grad(got.float().sum(), (x, w, b))
    ex, ew, eb = torch.autograd.grad(want.float().sum(), (x, w, b))
    assert gx.dtype == gw.dtype == torch.float32  # the parameters' and inputs' own dtype, as autocast gives
    for a, e in ((gx, ex), (gw, ew), (gb, eb)):
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2 * float(e.abs().max()))


def test_the_rule():
    big = torch.empty(512, 512, 3, 3)
    assert weight_bound(torch.empty(8, 512, 4, 4), big, 1, 1)  # 128 output pixels <= 512 channels
    assert weight_bound(torch.empty(8, 512, 8, 8), big, 1, 1)  # 512 <= 512
    assert not weight_bound(torch.empty(8, 512, 9, 9), big, 1, 1)
    assert weight_bound(torch.empty(8, 256, 8, 8), torch.empty(512, 256, 3, 3), 2, 1)
    assert not weight_bound(torch.empty(8, 128, 4, 4), torch.empty(128, 128, 3, 3), 1, 1)  # a small weight
    # bf16 / fp16 (autocast's dtype): up to 2 x C_out pixels, weights from 2**19 elements
    assert weight_bound(torch.empty(16, 512, 8, 8), big, 1, 1, dtype=torch.bfloat16)  # 1024 <= 2 x 512
    assert not weight_bound(torch.empty(16, 512, 8, 8), big, 1, 1)  # in float32 1024 > 512
    assert not weight_bound(torch.empty(16, 512, 12, 12), big, 1, 1, dtype=torch.bfloat16)
    assert weight_bound(torch.empty(8, 256, 4, 4), torch.empty(256, 256, 3, 3), 1, 1, dtype=torch.float16)
    assert not weight_bound(torch.empty(8, 256, 4, 4), torch.empty(256, 256, 3, 3), 1, 1)  # under 2**20 in fp32
    assert not weight_bound(torch.empty(1, 512, 4, 4), big, 1, 1, groups=2)
    assert not weight_bound(torch.empty(1, 512, 4, 4), big, 1, 1, dilation=2)
    assert not weight_bound(torch.empty(1, 512, 4, 4), big, 1, "same")
    assert not weight_bound(torch.empty(1, 512, 2, 2), big, 1, 0)  # no output pixel


def test_the_mode_routes_admitted_calls_only_where_autograd_records(monkeypatch):
    import vertebra.layers.gemm_conv as gc

    calls = []
    real = gc.gemm_conv2d
    monkeypatch.setattr(gc, "gemm_conv2d", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    conv_big = torch.nn.Conv2d(512, 512, 3, padding=1, bias=False)
    conv_small = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 512, 4, 4)
    with TrainingConvs():
        y = conv_big(x)
        conv_small(torch.randn(2, 16, 4, 4))
        with torch.no_grad():
            conv_big(x)
    assert calls == [conv_big.weight.shape]
    torch.testing.assert_close(y, F.conv2d(x, conv_big.weight, None, 1, 1), rtol=1e-4, atol=1e-4)
    assert isinstance(training_convs("cpu"), TrainingConvs)
    assert not isinstance(training_convs("meta"), TrainingConvs)


def test_a_detector_trains_the_same_with_and_without_it():
    """One training step of a RetinaNet on ResNet-18 at 96 px (layer4 is 3 x 3: its convolutions are admitted):
    the same losses and gradients as without the mode, to float32 rounding."""
    import vertebra

    torch.manual_seed(0)
    model = vertebra.create_detector("retinanet", backbone="resnet18", num_classes=3, min_size=96, max_size=96,
                                     fpn_channels=64, head_convs=1, trainable_stages=5, frozen_bn=False).train()
    images = torch.rand(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 5.0, 90.0, 40.0], [2.0, 2.0, 20.0, 30.0]]),
                "labels": torch.tensor([0, 2])}]

    def step(mode: bool):
        model.zero_grad()
        with TrainingConvs() if mode else contextlib.nullcontext():
            losses = model(images, targets)
        sum(losses.values()).backward()
        return ({k: float(v.detach()) for k, v in losses.items()},
                {n: p.grad.clone() for n, p in model.named_parameters()})

    import vertebra.layers.gemm_conv as gc

    used = []
    orig = gc.GemmConv2d.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gc.GemmConv2d, "forward", staticmethod(lambda ctx, *a: used.append(1) or orig(ctx, *a)))
        got_loss, got_grad = step(True)
    want_loss, want_grad = step(False)
    assert used, "no convolution of layer4 was admitted"
    for k in want_loss:
        assert got_loss[k] == pytest.approx(want_loss[k], rel=1e-5)
    for n, g in want_grad.items():
        torch.testing.assert_close(got_grad[n], g, rtol=1e-4, atol=1e-5 * max(float(g.abs().max()), 1.0))
