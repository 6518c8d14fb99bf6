"""VGG: Table 1 configurations, detector taps, BatchNorm folding."""

from __future__ import annotations

import torch

import vertebra
from vertebra.layers import fold_batchnorm


def test_configs_and_taps():
    with torch.device("meta"):
        for name, convs in (("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)):
            m = vertebra.create_backbone(name, features_only=True)
            assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == convs
        m = vertebra.create_backbone("vgg16", features_only=True, out_strides=(8, 16, 32))
        assert [(i.name, i.channels) for i in m.out_feature_info] == [("conv4_3", 512), ("conv5_3", 512),
                                                                       ("pool5", 512)]
        feats = m(torch.empty(1, 3, 300, 300))
    assert [f.shape[-1] for f in feats] == [37, 18, 9]


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(0)
    m = vertebra.create_backbone("vgg11_bn", features_only=True).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        out = fold_batchnorm(m)(x)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
