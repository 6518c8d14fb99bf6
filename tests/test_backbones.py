"""One parametrized test over the whole registry: every network honours the contract and
matches its paper's parameter count and, where one exists, its torchvision/timm twin."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vertebra
from vertebra.backbone import count_params
from vertebra.hub import list_weights
from vertebra.reference.twins import TWIN_BUILD_KWARGS, build_twin, has_timm, in_twin_order
from vertebra.weights import StateDictMismatch

ALL = vertebra.list_backbones()

# Twins that are our network only under a stated condition. They are not in the specs' references
# (which ``create_backbone(weights=...)``, the CLI and the benchmarks take for the same network), but
# their key maps exist and are tested here. Value: the arch kwargs that make ours the twin's network.
CONDITIONAL_TWINS = TWIN_BUILD_KWARGS  # twins that need a build argument of ours
TWIN_PAIRS = sorted({(n, r) for n in ALL for r in vertebra.backbone_spec(n).references} | set(CONDITIONAL_TWINS))


def small_size(model) -> int:
    """64 px (32 for the CIFAR nets); 32 px above the minimum for nets whose minimum is larger.

    At its very minimum a deep net ends in 1x1 maps, where a train-mode BatchNorm sees 2 values per
    channel at batch 2 and its backward amplifies float32 rounding layer after layer (PolyNet's
    gradients overflow at 75 px); a little above the minimum the check tests the network, not that."""
    paper = model.spec.input_size[-1] if model.spec is not None else 64
    m = model.min_input_size
    return max(min(64, paper), m + 32 if m > 32 else m)


def build(name: str, **kw):
    torch.manual_seed(0)
    return vertebra.create_backbone(name, **kw)


@pytest.mark.parametrize("name", ALL)
def test_contract(name):
    """Logits of the right shape; features match feature_info; backward reaches every parameter."""
    spec = vertebra.backbone_spec(name)
    model = build(name, num_classes=7)
    s = small_size(model)
    x = torch.randn(2, spec.input_size[0], s, s)
    model.train()
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 7)
    loss = sum(o.float().square().mean() for o in (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:10]}"

    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7), "eval mode returns the logits alone"
        final, feats = model.forward_intermediates(x)
        last = model.forward_features(x)
    info = model.feature_info  # a classifier's: every stage
    assert len(feats) == len(info) == len(model.stage_info) >= 1
    assert [f.shape[1] for f in feats] == info.channels()
    assert all(b.stride > a.stride for a, b in zip(info, info[1:]))
    assert torch.equal(final, feats[-1]) and torch.equal(last, feats[-1]) and last.shape[1] == model.num_features


@pytest.mark.parametrize("name", ALL)
def test_strides_at_paper_size(name):
    """At the paper's input size the spatial sizes follow the declared strides (built on meta)."""
    spec = vertebra.backbone_spec(name)
    with torch.device("meta"):
        model = vertebra.create_backbone(name, features_only=True).eval()
        c, h, w = spec.input_size
        feats = model(torch.empty(1, c, h, w))
        bigger = model(torch.empty(1, c, h + 64, w + 64))
    for f, g, info in zip(feats, bigger, model.feature_info):
        fh = f.shape[-2]
        assert fh <= math.ceil(h / info.stride), (info, tuple(f.shape))
        # valid-padding stems lose a few pixels (LeNet-5's 5x5 convolutions lose 28 of 32 by C5), but
        # the stride itself is exact: 64 more input pixels give 64 / stride more feature pixels
        exact = g.shape[-2] - fh == 64 // info.stride
        assert exact or 0.85 * h / info.stride - 1 <= fh, (info, tuple(f.shape), tuple(g.shape))


@pytest.mark.parametrize("name", ALL)
def test_reset_classifier(name):
    """timm's reset_classifier on every network (built on meta: shapes only): n classes, then 0 (the pooled
    pre-logits features, head_hidden_size wide, what forward_head(pre_logits=True) gives), then n again;
    get_classifier is the new module, its parameters freshly made; the auxiliary classifiers follow."""
    spec = vertebra.backbone_spec(name)
    with torch.device("meta"):
        model = vertebra.create_backbone(name).eval()
    s = small_size(model)
    x = torch.empty(2, spec.input_size[0], s, s, device="meta")
    old = model.get_classifier()
    model.reset_classifier(7)
    new = model.get_classifier()
    assert new is not old and model.num_classes == 7
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model(x).shape == (2, 7)
    f = model.forward_features(x)  # the heads run on it: one pass through the body
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.num_classes == 0
    assert model.forward_head(f).shape == model.forward_head(f, pre_logits=True).shape == (2, model.head_hidden_size)
    model.reset_classifier(3)
    assert model.forward_head(f).shape == (2, 3)
    for aux in getattr(model, "aux_heads", None) or ():
        assert aux.get_classifier().out_features == 3


# Rows of the facts table whose figure is not the paper's network. Each is explained and strict:
# the test fails the day the count starts to match, so the row gets corrected then.
FIGURE_NOT_THE_PAPERS = {
    "inception_resnet_v1": "the table's 23.995624M is imgclsmob's facenet variant (a 6th IR-C block and a "
    "1792-512-BN head); the paper's Fig. 15 network (5/10/5 blocks, linear classifier) has 22.756328M, and "
    "adding exactly those layers gives the table's figure",
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(reason=FIGURE_NOT_THE_PAPERS[n], strict=True))
     if n in FIGURE_NOT_THE_PAPERS else n for n in ALL],
)
def test_params_match_paper(name):
    spec = vertebra.backbone_spec(name)
    if spec.paper_params_m is None:
        pytest.skip(f"no parameter figure for {name} in the facts table ({spec.source or 'none'})")
    with torch.device("meta"):
        n = count_params(vertebra.create_backbone(name))
    dev = 100 * (n / 1e6 - spec.paper_params_m) / spec.paper_params_m
    assert abs(dev) <= spec.params_tol_pct, f"{n / 1e6:.6f}M vs paper {spec.paper_params_m}M ({dev:+.2f}%)"


def _randomise_bn(model: torch.nn.Module) -> None:
    """BN statistics and affine parameters away from their 0/1 init (positive scales), so a key map
    that pairs the wrong BN tensors shows in the outputs."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("name,reference", TWIN_PAIRS, ids=[f"{n}-{r}" for n, r in TWIN_PAIRS])
def test_twin_equal(name, reference):
    """Same outputs as the torchvision/timm twin after load_reference_weights; the features_only
    model loads the same state_dict and gives bit-identical features."""
    source = reference.split(":", 1)[0]
    if source == "timm" and not has_timm():
        pytest.skip("timm is not installed")
    kw = CONDITIONAL_TWINS.get((name, reference), {})
    torch.manual_seed(1)
    twin = build_twin(reference).eval()
    _randomise_bn(twin)
    model = build(name, **kw).eval()
    assert count_params(model) == count_params(twin)
    # as a downloaded safetensors file holds them (keys sorted), put back in the twin's order (hub's load path)
    sd = in_twin_order(dict(sorted(twin.state_dict().items())), reference)
    vertebra.load_reference_weights(model, sd, source=source)
    s = small_size(model)
    x = torch.randn(2, model.in_chans, s, s)
    with torch.no_grad():
        ref = twin(x)
        ours = model(x)
        scale = ref.abs().max().clamp_min(1e-6)
        assert (ours - ref).abs().max() <= 1e-5 * scale
        # the inference path (BatchNorm folded, fused and packed oneDNN / MKL calls) within the same tolerance,
        # or within 20x the network's own float32 rounding where that is larger (a deep random network amplifies
        # rounding: SE-ResNet-101's float32 outputs differ from its float64 ones by 2e-3 of their scale)
        fast = vertebra.optimize_for_inference(model)
        assert (fast(x) - ref).abs().max() <= max(1e-5 * scale, 20 * float32_rounding(model, x, ref))
        # the features_only model loads the same state_dict (its head keys are dropped)
        fo = build(name, features_only=True, **kw).eval()
        vertebra.load_reference_weights(fo, twin.state_dict(), source=source)
        for a, b in zip(fo(x), model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def float32_rounding(model, x, want) -> float:
    """How far the float32 outputs ``want`` of ``model`` at ``x`` are from its float64 ones."""
    with torch.no_grad():
        return float((copy.deepcopy(model).double()(x.double()) - want.double()).abs().max())


@pytest.mark.parametrize("name", ALL)
def test_inference_path_keeps_the_outputs(name):
    """optimize_for_inference (folds, fusions, pre-activation clamps, DenseNet's buffer) computes the eval model's
    function exactly: in float64 (plain ops) to 1e-6; in float32 (oneDNN / MKL calls, packed weights) within
    2e-5 of the scale or 20x the network's own float32 rounding; with BatchNorm scales of both signs and zero,
    at two batch sizes, and again after a deep copy (the packed weights are rebuilt). Where those statistics overflow
    float32, the float32 part takes the network's initial ones (and a
    smaller input where those overflow too)."""
    model = build(name).eval()
    _randomise_bn(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.weight is not None:
                m.weight[::7] *= -1
                m.weight[3::11] = 0
    s = small_size(model)
    x = torch.randn(2, model.in_chans, s, s)
    exact = copy.deepcopy(model).double()
    with torch.inference_mode():
        want = exact(x.double())
        got = vertebra.optimize_for_inference(exact)(x.double())
        # float64 rounding only (a deep network with these statistics amplifies it: SE-ResNet-152 4e-8)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max().clamp_min(1e-6)
        if not torch.isfinite(model(x)).all():  # PreAct-ResNet-1001 overflows float32 with these statistics
            model = build(name).eval()
        for _ in range(4):  # and with its initial ones (activations grow 1e42-fold): a smaller input then
            if torch.isfinite(model(x)).all():
                break
            x = x * 1e-10
    fast = vertebra.optimize_for_inference(model)
    with torch.inference_mode():
        for batch in (1, 2):
            want = model(x[:batch])
            diff = float((fast(x[:batch]) - want).abs().max())
            tol = 2e-5 * float(want.abs().max().clamp_min(1e-6))
            if diff > tol:  # the float64 run only where needed (most networks pass the first bound)
                tol = max(tol, 20 * float32_rounding(model, x[:batch], want))
            assert diff <= tol, batch
        assert (copy.deepcopy(fast)(x) - want).abs().max() <= tol


def test_every_published_weights_entry_is_a_tested_twin():
    """No weights entry whose key map test_twin_equal does not exercise (with the entry's build arguments)."""
    for w in list_weights():
        if w.network.startswith("retinanet_"):  # tests/test_pretrained_models.py (torchvision's parity)
            continue
        assert (w.network, w.twin) in TWIN_PAIRS, (w.network, w.tag, w.twin)
        assert CONDITIONAL_TWINS.get((w.network, w.twin), {}) == w.build_kwargs


# -- one home per fact ---------------------------------------------------------------------


def test_table_metadata_agrees_with_register():
    """``@register`` owns family/paper/year/arxiv; the facts table's copies, where filled, must agree."""
    from vertebra.reference import load_facts

    wrong = []
    for name, row in load_facts().items():
        if name not in ALL:
            continue
        spec = vertebra.backbone_spec(name)
        for field in ("family", "paper", "year", "arxiv"):
            cell = row.get(field, "")
            if not cell:
                continue
            want = {"year": lambda c: int(c), "arxiv": lambda c: None if c == "none" else c}.get(field, str)(cell)
            if getattr(spec, field) != want:
                wrong.append(f"{name}.{field}: @register {getattr(spec, field)!r}, table {want!r}")
    assert not wrong, "\n".join(wrong)


def test_keymaps_name_registered_networks():
    """Every key map names registered networks (it cannot outlive a rename), and every reference has one."""
    import fnmatch

    from vertebra.reference.keymaps import find_keymap, registered_keymaps

    stale = [(src, pat) for src, pat in registered_keymaps() if not fnmatch.filter(ALL, pat)]
    assert not stale, f"key maps for no registered network: {stale}"
    missing = [(n, r) for n, r in TWIN_PAIRS if find_keymap(r.split(":", 1)[0], n) is None]
    assert not missing, f"references without a key map: {missing}"


def test_drop_path_refused_once_for_non_residual_nets():
    """One refusal, in create_backbone, for every network whose spec says it has nothing to drop."""
    for name in ALL:
        spec = vertebra.backbone_spec(name)
        if not spec.supports_drop_path:
            with pytest.raises(ValueError, match=f"{name} has no residual branches to drop"):
                vertebra.create_backbone(name, drop_path_rate=0.1)


# -- bad input ---------------------------------------------------------------------------


def test_unknown_name_lists_closest():
    with pytest.raises(KeyError, match="resnet50"):
        vertebra.create_backbone("resnet51")
    with pytest.raises(KeyError, match="closest"):
        vertebra.backbone_spec("resnt18")


def test_input_below_minimum_names_size():
    model = vertebra.create_backbone("resnet18").eval()
    m = model.min_input_size
    with pytest.raises(ValueError, match=f"at least {m}x{m}"):
        model(torch.randn(1, 3, m - 1, m - 1))


def test_unknown_stride_lists_strides():
    with pytest.raises(ValueError, match="its strides are 2, 4, 8, 16, 32"):
        vertebra.create_backbone("resnet18", features_only=True, out_strides=(64,))


def test_out_strides_select_stages():
    model = vertebra.create_backbone("resnet18", features_only=True, out_strides=(32, 8)).eval()
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [128, 512]
    assert [i.stride for i in model.out_feature_info] == [8, 32]
    assert model.head is None


def test_partial_state_dict_fails_listing_keys():
    import torchvision

    sd = torchvision.models.resnet18().state_dict()
    del sd["layer1.0.conv1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    model = vertebra.create_backbone("resnet18")
    with pytest.raises(StateDictMismatch) as e:
        vertebra.load_reference_weights(model, sd, source="torchvision")
    assert "layer1.0.conv1.conv.weight" in str(e.value) and "extra.weight" in str(e.value)
    with pytest.raises(StateDictMismatch, match="96 unexpected keys"):
        vertebra.load_reference_weights(model, torchvision.models.resnet34().state_dict(), source="torchvision")


def test_weights_argument_loads_own_and_twin_checkpoints(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    tv = torchvision.models.resnet18().eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model = vertebra.create_backbone("resnet18", weights=tmp_path / "tv.pth").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "own.safetensors"))
    again = vertebra.create_backbone("resnet18", weights=tmp_path / "own.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        vertebra.create_backbone("resnet18", weights=tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        vertebra.create_backbone("resnet18", weights=tmp_path / "bad.pth")
