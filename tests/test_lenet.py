"""LeNet-5 as the 1998 paper builds it: sparse C3, trainable subsampling, fixed RBF output."""

from __future__ import annotations

import pytest
import torch

import vertebra
from vertebra.backbones.lenet import C3_TABLE, EuclideanRBF, digit_codes


def build(**kw):
    torch.manual_seed(0)
    return vertebra.create_backbone("lenet5", **kw)


def test_parameter_budget_layer_by_layer():
    m = build()
    counts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in
              [("c1", m.c1), ("s2", m.s2), ("c3", m.c3), ("s4", m.s4), ("c5", m.c5), ("f6", m.head.f6)]}
    assert counts == {"c1": 156, "s2": 12, "c3": 1516, "s4": 32, "c5": 48120, "f6": 10164}
    assert sum(p.numel() for p in m.parameters()) == 60000
    assert not any(p is m.head.rbf.centres for p in m.parameters()), "RBF centres are fixed, not trained"


def test_c3_follows_table_one():
    m = build()
    assert sorted(len(t) for t in C3_TABLE) == [3] * 6 + [4] * 9 + [6]
    dense = m.c3.dense_weight()
    connected = dense.abs().sum((2, 3)) != 0
    expected = torch.zeros(16, 6, dtype=torch.bool)
    for o, inputs in enumerate(C3_TABLE):
        expected[o, list(inputs)] = True
    assert torch.equal(connected, expected)
    # an input map outside the table does not reach the output map
    x = torch.zeros(1, 6, 14, 14, requires_grad=True)
    m.c3(x)[0, 0].sum().backward()
    assert x.grad[0, 3:].abs().sum() == 0 and x.grad[0, :3].abs().sum() > 0


def test_subsampling_is_trainable_sum_not_max():
    m = build()
    with torch.no_grad():
        m.s2.weight.fill_(0.5)
        m.s2.bias.fill_(0.1)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 6, 1, 1)
    out = m.s2(x)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.5 * (0 + 1 + 4 + 5) + 0.1)


def test_rbf_logits_are_negative_distances():
    codes = torch.tensor(digit_codes(10))
    assert codes.shape == (10, 84) and set(codes.unique().tolist()) == {-1.0, 1.0}
    rbf = EuclideanRBF(codes)
    out = rbf(codes[[3, 7]])
    assert out.argmax(1).tolist() == [3, 7]
    assert torch.equal(out[:, [3, 7]].diagonal(), torch.zeros(2))
    assert len(digit_codes(12)) == 12 and digit_codes(12) == digit_codes(12)


def test_any_input_from_32_and_exact_strides():
    m = build(features_only=True).eval()
    sizes = {}
    for s in (32, 64, 96):
        sizes[s] = [f.shape[-1] for f in m(torch.randn(1, 1, s, s))]
    assert sizes[32] == [28, 10, 1]
    for (a, b) in ((32, 64), (64, 96)):
        assert [y - x for x, y in zip(sizes[a], sizes[b])] == [32 // i.stride for i in m.feature_info]
    clf = build(num_classes=10).eval()
    assert clf(torch.randn(2, 1, 45, 61)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 32x32"):
        clf(torch.randn(1, 1, 28, 28))


def test_no_drop_path():
    with pytest.raises(ValueError, match="drop_path_rate"):
        vertebra.create_backbone("lenet5", drop_path_rate=0.1)
