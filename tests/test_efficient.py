"""The efficient networks (SqueezeNet, MobileNet v1/v2, ShuffleNet v1/V2, CondenseNet, MnasNet):
compute against the papers' mult-add budgets and the paper-specific behaviour (bypasses, resolution
multiplier, CondenseNet's condensation). Every twin is tested in test_backbones.test_twin_equal."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vertebra
from vertebra.backbone import count_params

FAMILIES = ("SqueezeNet", "MobileNet", "MobileNetV2", "ShuffleNet", "ShuffleNet V2", "CondenseNet", "MnasNet")
OURS = [n for n in vertebra.list_backbones() if vertebra.backbone_spec(n).family in FAMILIES]


def gmacs(name: str, size: int | None = None, **kw) -> float:
    """Multiply-adds of one forward pass at the paper's input size (or ``size``), counted on
    the meta device: FlopCounterMode counts 2 flops per multiply-add of every conv and linear."""
    spec = vertebra.backbone_spec(name)
    c, h, w = spec.input_size
    if size is not None:
        h = w = size
    with torch.device("meta"):
        model = vertebra.create_backbone(name, **kw).eval()
        x = torch.empty(1, c, h, w)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() / 2 / 1e9


# The papers state budgets in mult-adds, counting convolutions and the classifier and nothing
# else, which is exactly what FlopCounterMode counts. The papers round to 2-3 significant
# figures (140M, 0.3B) and some count a slightly different classifier; every deviation seen is
# under 2% (ShuffleNet V2 2x: 583M vs 591M), while a structural error (a missing or extra block,
# a wrong width or stride) moves the count by far more than 5%.
GMACS_TOL = 0.05

WITH_GMACS = [n for n in OURS if vertebra.backbone_spec(n).paper_gmacs is not None]

# budgets the paper states for variants the facts table has no row for (GMACs at 224)
PAPER_GMACS_EXTRA = {
    "mobilenet_v1_0_75": 0.325,  # Table 6
    "mobilenet_v1_0_5": 0.149,
    "mobilenet_v1_0_25": 0.041,
    "shufflenet_g1": 0.143,  # Table 1, complexity row
    "shufflenet_g2": 0.140,
    "shufflenet_g4": 0.133,
    "shufflenet_g3_x0_5": 0.038,  # Table 2
    "shufflenet_g3_x2_0": 0.524,
    "mobilenet_v2_1_4": 0.585,  # Table 4
}


@pytest.mark.parametrize("name", WITH_GMACS)
def test_gmacs_match_paper(name):
    spec = vertebra.backbone_spec(name)
    got = gmacs(name)
    assert abs(got - spec.paper_gmacs) <= GMACS_TOL * spec.paper_gmacs, f"{got:.4f} vs paper {spec.paper_gmacs}"


@pytest.mark.parametrize("name", sorted(PAPER_GMACS_EXTRA))
def test_gmacs_match_paper_variants(name):
    want = PAPER_GMACS_EXTRA[name]
    got = gmacs(name)
    assert abs(got - want) <= GMACS_TOL * want, f"{got:.4f} vs paper {want}"


def test_mobilenet_v1_resolution_multiplier():
    """Table 7: rho is the input size; 224/192/160/128 give 569/418/290/186 M mult-adds."""
    for size, want in ((224, 0.569), (192, 0.418), (160, 0.290), (128, 0.186)):
        assert abs(gmacs("mobilenet_v1", size) - want) <= GMACS_TOL * want


def test_mobilenet_v1_width_multiplier_params():
    """Table 6: 4.2M / 2.6M / 1.3M / 0.5M parameters for alpha = 1, 0.75, 0.5, 0.25."""
    for name, want in (("mobilenet_v1", 4.2), ("mobilenet_v1_0_75", 2.6), ("mobilenet_v1_0_5", 1.3),
                       ("mobilenet_v1_0_25", 0.5)):
        with torch.device("meta"):
            n = count_params(vertebra.create_backbone(name)) / 1e6
        assert round(n, 1) == want
    with torch.device("meta"):
        assert count_params(vertebra.create_backbone("mobilenet_v1", width_mult=0.5)) == count_params(
            vertebra.create_backbone("mobilenet_v1_0_5"))


def test_mobilenet_v1_paper_activation_is_relu():
    model = vertebra.create_backbone("mobilenet_v1")
    acts = {type(m) for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))}
    assert acts == {torch.nn.ReLU}


# -- SqueezeNet ----------------------------------------------------------------------------


def test_squeezenet_has_no_stride_32():
    for name in ("squeezenet1_0", "squeezenet1_1"):
        model = vertebra.create_backbone(name, features_only=True)
        assert model.strides == [2, 4, 8, 16]
        with pytest.raises(ValueError, match="no stage at stride 32"):
            vertebra.create_backbone(name, features_only=True, out_strides=(32,))


def test_squeezenet_bypasses():
    """Simple bypass: identities around fire3/5/7/9, no parameters; complex: 1x1 convs around
    fire2/4/6/8 too. With the bypass convs zeroed the complex net equals the simple one."""
    torch.manual_seed(0)
    simple = vertebra.create_backbone("squeezenet1_0_simple_bypass").eval()
    complex_ = vertebra.create_backbone("squeezenet1_0_complex_bypass").eval()
    plain = vertebra.create_backbone("squeezenet1_0")
    assert count_params(simple) == count_params(plain)
    extra = count_params(complex_) - count_params(plain)
    assert extra == sum(i * o + o for i, o in ((96, 128), (128, 256), (256, 384), (384, 512)))
    sd = {k: v for k, v in complex_.state_dict().items() if "bypass_conv" not in k}
    simple.load_state_dict(sd)
    for m in complex_.modules():
        if getattr(m, "bypass_conv", None) is not None:
            torch.nn.init.zeros_(m.bypass_conv.weight)
            torch.nn.init.zeros_(m.bypass_conv.bias)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(simple(x), complex_(x))
        assert not torch.allclose(simple(x), plain.eval()(x))


# -- CondenseNet ---------------------------------------------------------------------------


def test_condensenet_c8_paper_budget():
    """Table 5's G = C = 8 model (2.9M parameters, 274M mult-adds; not in the facts table).
    The authors' counter adds ~12M for ReLUs and pools, which FlopCounterMode does not count."""
    with torch.device("meta"):
        n = count_params(vertebra.create_backbone("condensenet74_c8_g8")) / 1e6
    assert abs(n - 2.9) <= 0.02 * 2.9
    assert abs(gmacs("condensenet74_c8_g8") - 0.274) <= GMACS_TOL * 0.274


def test_condensation_schedule():
    from vertebra.layers.learned_group_conv import condensation_stage

    # C - 1 condensing stages over the first half of training, then the optimisation stage
    assert [condensation_stage(p, 4) for p in (0, 0.1, 1 / 6, 0.3, 1 / 3, 0.49, 0.5, 0.9, 1.0)] == [
        0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert condensation_stage(0.25, 8) == 3
    torch.manual_seed(0)
    model = vertebra.create_backbone("condensenet86_cifar", condensed=False)
    lgc = model.learned_group_convs()[5]
    assert lgc.mask.sum().item() == lgc.groups * lgc.in_ch
    for p, stage in ((0.1, 0), (0.2, 1), (0.4, 2), (0.6, 3)):
        assert model.set_progress(p) == stage
        for m in model.learned_group_convs():
            kept = m.mask.sum(1)
            assert (kept == m.in_ch - stage * (m.in_ch // m.condense_factor)).all()
    assert model.lasso_loss().item() == 0.0  # fully condensed: the penalty is off


def test_condensation_drops_weakest_inputs_per_group():
    from vertebra.layers.learned_group_conv import LearnedGroupConv

    lgc = LearnedGroupConv(8, 8, groups=2, condense_factor=4)
    with torch.no_grad():
        w = torch.ones(8, 8)
        w[0::2, 3] = 0.01  # group 0 (filters 0, 2, 4, 6) barely uses inputs 3 and 5
        w[0::2, 5] = 0.02
        w[1::2, 6] = 0.0  # group 1 ignores inputs 6 and 0
        w[1::2, 0] = 0.03
        lgc.conv.weight.copy_(w[:, :, None, None])
    lgc.condense_to(1)
    assert lgc.mask[0].nonzero().flatten().tolist() == [0, 1, 2, 4, 6, 7]
    assert lgc.mask[1].nonzero().flatten().tolist() == [1, 2, 3, 4, 5, 7]


def test_lasso_loss_has_gradient():
    model = vertebra.create_backbone("condensenet86_cifar", condensed=False, num_classes=10)
    model.train()
    loss = model(torch.randn(2, 3, 32, 32)).square().mean() + 1e-5 * model.lasso_loss()
    loss.backward()
    assert model.learned_group_convs()[0].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,condense_fc", [("condensenet86_cifar", False), ("condensenet74_c4_g4", True)])
def test_condense_equals_masked_network(name, condense_fc):
    from vertebra.backbones.condensenet import condense

    torch.manual_seed(0)
    train_net = vertebra.create_backbone(name, condensed=False, condense_fc=condense_fc, num_classes=10)
    # random BN statistics and affine parameters so the index layer's BN copy is exercised
    for m in train_net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    train_net.set_progress(0.5)
    train_net.eval()
    net = condense(train_net).eval()
    assert net.condensed and not train_net.condensed
    reference = vertebra.create_backbone(name, condense_fc=condense_fc, num_classes=10)
    assert count_params(net) == count_params(reference)
    assert net.state_dict().keys() == reference.state_dict().keys()
    size = 32 if name.endswith("cifar") else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for a, b in zip(net.forward_intermediates(x, intermediates_only=True),
                        train_net.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if condense_fc:
            # the masked training network: the FC columns the condensed classifier dropped are zero
            kept = net.head.fc.index
            dropped = torch.ones(train_net.head.fc.in_features, dtype=torch.bool)
            dropped[kept] = False
            train_net.head.fc.weight[:, dropped] = 0.0
        torch.testing.assert_close(net(x), train_net(x), rtol=1e-4, atol=1e-4)
    # the condensed weights load into a freshly built inference network
    reference.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x), net(x), rtol=0, atol=0)


def test_condense_features_only():
    from vertebra.backbones.condensenet import condense

    train_net = vertebra.create_backbone("condensenet86_cifar", condensed=False, features_only=True,
                                         out_strides=(2, 4))
    net = condense(train_net).eval()
    assert net.head is None and [i.stride for i in net.out_feature_info] == [2, 4]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(net(x), train_net.eval()(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -- ShuffleNet v1, residual nets ------------------------------------------------------------


@pytest.mark.parametrize("groups,widths", [(1, (144, 288, 576)), (2, (200, 400, 800)), (3, (240, 480, 960)),
                                           (4, (272, 544, 1088)), (8, (384, 768, 1536))])
def test_shufflenet_stage_widths_table1(groups, widths):
    with torch.device("meta"):
        model = vertebra.create_backbone(f"shufflenet_g{groups}")
    assert [i.channels for i in model.feature_info] == [24, 24, *widths]
    assert [i.stride for i in model.feature_info] == [2, 4, 8, 16, 32]
    # Stage2's first pointwise conv is not grouped (its input has only 24 channels); the rest are
    assert model.stage2[0].conv1.conv.groups == 1
    assert model.stage2[1].conv1.conv.groups == groups and model.stage2[0].conv3.conv.groups == groups


def test_shufflenet_scales():
    with torch.device("meta"):
        half = vertebra.create_backbone("shufflenet_g3_x0_5")
        double = vertebra.create_backbone("shufflenet_g3_x2_0")
    assert [i.channels for i in half.feature_info] == [12, 12, 120, 240, 480]
    assert [i.channels for i in double.feature_info] == [48, 48, 480, 960, 1920]


@pytest.mark.parametrize("name", ["mobilenet_v2", "mnasnet_a1", "shufflenet_g3"])
def test_drop_path_in_residual_nets(name):
    """Stochastic depth's linear rule (Huang et al., Sec. 3): block l of L drops its residual branch
    with rate p_L * l / L; blocks without an identity shortcut have nothing to drop."""
    from vertebra.backbones.shufflenet import ShuffleUnit
    from vertebra.layers import DropPath, InvertedResidual

    model = vertebra.create_backbone(name, drop_path_rate=0.2, num_classes=5)
    blocks = [m for m in model.modules() if isinstance(m, (InvertedResidual, ShuffleUnit))]
    got = [b.drop_path.p if isinstance(b.drop_path, DropPath) else None for b in blocks]
    residual = [b.use_shortcut if isinstance(b, InvertedResidual) else b.stride == 1 for b in blocks]
    want = [0.2 * (i + 1) / len(blocks) if r else None for i, r in enumerate(residual)]
    assert any(residual) and got == pytest.approx(want)
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()


@pytest.mark.parametrize("width,channels", [(0.5, (48, 96, 192, 1024)), (1.0, (116, 232, 464, 1024)),
                                            (1.5, (176, 352, 704, 1024)), (2.0, (244, 488, 976, 2048))])
def test_shufflenet_v2_widths_table5(width, channels):
    """Table 5: Stage2/3/4 and conv5 output channels of the four sizes."""
    name = f"shufflenet_v2_x{width:.1f}".replace(".", "_")
    with torch.device("meta"):
        model = vertebra.create_backbone(name)
    assert [i.channels for i in model.feature_info] == [24, 24, *channels[:3]]
    assert model.head.conv.conv.out_channels == channels[3]
    with pytest.raises(ValueError, match="Table 5"):
        vertebra.create_backbone("shufflenet_v2_x1_0", width=0.75)


@pytest.mark.parametrize("name", ["squeezenet1_0", "mobilenet_v1", "shufflenet_v2_x1_0", "condensenet86_cifar"])
def test_drop_path_refused_without_residuals(name):
    with pytest.raises(ValueError, match="drop_path_rate"):
        vertebra.create_backbone(name, drop_path_rate=0.1)
