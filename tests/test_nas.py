"""NASNet-A, AmoebaNet-A, PNASNet-5: compute against the papers, genotype wiring, auxiliary
heads, scheduled drop-path, TF 'SAME' padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vertebra
from vertebra.backbones.nas.cells import Cell, SamePad, SepConv
from vertebra.backbones.nas.genotypes import AMOEBANET_A, NASNET_A, PNASNET_5, CellGenotype

NAMES = ["nasnet_a_mobile", "nasnet_a_large", "amoebanet_a_mobile", "amoebanet_a_large", "pnasnet5_mobile",
         "pnasnet5_large"]

# The papers count the mult-adds of the convolutions and the classifier, which is what
# FlopCounterMode counts (pooling, BatchNorm and the additions are not counted by either). With
# the structure pinned down by the parameter counts (exact for NASNet-A and PNASNet-5 Large, within
# 0.7% for the others) what remains is the papers' rounding to three digits (up to 0.2% for 0.555,
# 0.564, 0.588) and, for AmoebaNet-A Large, the stem convolution's width, which neither the paper
# nor the release's code fixes (an hparam there; 96 here, as NASNet-A Large at the same 331 px):
# +1.2%. 2% covers these and fails for any change of cell, width or stride.
MACS_TOL_PCT = 2.0


@pytest.mark.parametrize("name", NAMES)
def test_macs_match_paper(name):
    spec = vertebra.backbone_spec(name)
    with torch.device("meta"):
        model = vertebra.create_backbone(name).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, *spec.input_size))
    gmacs = counter.get_total_flops() / 2 / 1e9
    dev = 100 * (gmacs - spec.paper_gmacs) / spec.paper_gmacs
    assert abs(dev) <= MACS_TOL_PCT, f"{gmacs:.4f} GMACs vs paper {spec.paper_gmacs} ({dev:+.2f}%)"


@pytest.mark.parametrize("name, channels", [
    ("nasnet_a_large", [96, 168, 1008, 2016, 4032]),  # timm nasnetalarge feature_info
    ("pnasnet5_large", [96, 270, 1080, 2160, 4320]),  # timm pnasnet5large feature_info
    ("amoebanet_a_large", [96, 235, 760, 1520, 3040]),
])
def test_feature_taps(name, channels):
    with torch.device("meta"):
        model = vertebra.create_backbone(name, features_only=True)
    assert [f.channels for f in model.feature_info] == channels
    assert model.strides == [2, 4, 8, 16, 32]


def _record_wiring(cell: Cell, s0: torch.Tensor, s1: torch.Tensor):
    """Run the cell and return (states rebuilt from the recorded op outputs, the input of each
    op, the cell output)."""
    ins, outs = {}, {}
    handles = []
    for i, op in enumerate(cell.ops):
        handles.append(op.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0])))
        handles.append(op.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)))
    pre = {}
    handles.append(cell.pre0.register_forward_hook(lambda m, a, o: pre.__setitem__(0, o)))
    handles.append(cell.pre1.register_forward_hook(lambda m, a, o: pre.__setitem__(1, o)))
    with torch.no_grad():
        out = cell(s0, s1)
    for h in handles:
        h.remove()
    states = [pre[0], pre[1]] + [outs[2 * j] + outs[2 * j + 1] for j in range(len(cell.ops) // 2)]
    return states, ins, out


@pytest.mark.parametrize("genotype", [NASNET_A, AMOEBANET_A, PNASNET_5], ids=lambda g: g.name)
@pytest.mark.parametrize("reduction", [False, True], ids=["normal", "reduction"])
def test_cell_round_trips_genotype(genotype, reduction):
    g = genotype.reduction if reduction else genotype.normal
    c = 8
    torch.manual_seed(0)
    cell = Cell(g, 24, 32, c, reduction=reduction).eval()
    # built: one op per edge, of the genotype's kind, reading the genotype's input
    assert len(cell.ops) == 2 * g.num_blocks
    for j, block in enumerate(g.blocks):
        assert cell.reads[2 * j: 2 * j + 2] == g.inputs_of(j)
        for (op_name, idx), op in zip(block, cell.ops[2 * j: 2 * j + 2]):
            stride = 2 if reduction and idx < 2 else 1
            if op_name.startswith("sep"):
                assert isinstance(op, SepConv) and op.dw1.kernel_size[0] == int(op_name[4])
                assert op.dw1.stride == (stride, stride)
            elif op_name.startswith(("avg", "max")):
                kind = nn.AvgPool2d if op_name.startswith("avg") else nn.MaxPool2d
                assert isinstance(op.pool, kind) and op.pool.stride in (stride, (stride, stride))
            elif op_name == "identity":
                assert isinstance(op, nn.Identity) == (stride == 1)
    assert cell.out_channels == c * len(g.concat)
    # wired: each op reads the hidden state the genotype names; the output concatenates `concat`
    s0, s1 = torch.randn(2, 24, 12, 12), torch.randn(2, 32, 12, 12)
    states, ins, out = _record_wiring(cell, s0, s1)
    for i, idx in enumerate(cell.reads):
        assert torch.equal(ins[i], states[idx]), f"op {i} does not read hidden state {idx}"
    torch.testing.assert_close(out, torch.cat([states[i] for i in g.concat], 1), rtol=0, atol=0)
    assert out.shape[-1] == (6 if reduction else 12)


def test_genotype_rejects_bad_cells():
    with pytest.raises(ValueError, match="unknown operation"):
        CellGenotype(blocks=((("sep_9x9", 0), ("identity", 1)),), concat=(2,))
    with pytest.raises(ValueError, match="reads hidden state 3"):
        CellGenotype(blocks=((("sep_3x3", 3), ("identity", 1)),), concat=(2,))
    with pytest.raises(ValueError, match="cannot output"):
        Cell(NASNET_A.normal, 8, 8, 8, reduction=True)


@pytest.mark.parametrize("name", ["nasnet_a_mobile", "pnasnet5_mobile", "amoebanet_a_mobile"])
def test_aux_head(name):
    torch.manual_seed(0)
    model = vertebra.create_backbone(name, num_classes=5, aux_logits=True)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 5)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    assert vertebra.create_backbone(name, features_only=True, aux_logits=True).aux_heads is None


def test_scheduled_drop_path():
    model = vertebra.create_backbone("pnasnet5_mobile", num_classes=3, drop_path_rate=0.4)
    rates = [cell.drop_path.p_max for cell in model.cells]
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.4)
    model.set_drop_path_progress(0.5)
    assert all(cell.drop_path.p == pytest.approx(cell.drop_path.p_max / 2) for cell in model.cells)
    with pytest.raises(ValueError, match="progress"):
        model.set_drop_path_progress(1.5)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert model(x).shape == (2, 3)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("size", [7, 8, 31, 32])
def test_same_pad_is_tf_same(size):
    """TF 'SAME' at stride 2: output ceil(n/2), the odd padding pixel at the bottom/right."""
    x = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    padded = SamePad(3, 2)(x)
    total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
    assert padded.shape[-1] == size + total
    assert torch.equal(padded[..., total // 2: total // 2 + size, total // 2: total // 2 + size], x)
    assert nn.functional.max_pool2d(padded, 3, 2).shape[-1] == -(-size // 2)
