"""AlexNet (two towers as groups, the paper's LRN) and ZFNet (Fig. 3 sizes)."""

from __future__ import annotations

import torch

import vertebra
from vertebra.layers import lrn


def test_alexnet_towers_are_groups():
    with torch.device("meta"):
        m = vertebra.create_backbone("alexnet")
    groups = [getattr(m, f"conv{i}").conv.groups for i in range(1, 6)]
    assert groups == [1, 2, 1, 2, 2]
    assert tuple(m.conv2.conv.weight.shape) == (256, 48, 5, 5)
    assert tuple(m.conv3.conv.weight.shape) == (384, 256, 3, 3)
    assert isinstance(m.lrn1, torch.nn.LocalResponseNorm)


def test_lrn_is_the_papers_formula():
    torch.manual_seed(0)
    a = torch.randn(1, 12, 3, 3) * 10
    sq = torch.nn.functional.pad(a.square(), (0, 0, 0, 0, 2, 2))
    window = sum(sq[:, i : i + 12] for i in range(5))
    expected = a / (2.0 + 1e-4 * window) ** 0.75
    torch.testing.assert_close(lrn()(a), expected)


def test_paper_sizes():
    x = torch.empty(1, 3, 224, 224, device="meta")
    with torch.device("meta"):
        alex = vertebra.create_backbone("alexnet", features_only=True)
        zf = vertebra.create_backbone("zfnet", features_only=True)
    assert [f.shape[-1] for f in alex(x)] == [55, 27, 13, 6]
    assert [f.shape[-1] for f in zf(x)] == [110, 55, 26, 13, 6]
    assert [f.shape[1] for f in zf(x)] == [96, 96, 256, 256, 256]


def test_smallest_inputs_run():
    for name in ("alexnet", "zfnet"):
        with torch.device("meta"):
            m = vertebra.create_backbone(name, num_classes=5).eval()
        s = m.min_input_size
        assert m(torch.empty(1, 3, s, s, device="meta")).shape == (1, 5)
