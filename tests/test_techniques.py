"""The Inception-line training techniques in vertebra.engine.techniques."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vertebra.engine.config import TrainConfig
from vertebra.engine.optim import RMSpropTF, build_optimizer, lr_factor
from vertebra.engine.techniques import (
    GOOGLENET_AUX_WEIGHT,
    INCEPTION_V3_AUX_WEIGHT,
    ModelEma,
    aux_loss,
    clip_gradients,
    default_aux_weight,
    label_smoothing_cross_entropy,
)
from vertebra.registry import backbone_spec


def test_aux_loss_weights_auxiliary_outputs():
    torch.manual_seed(0)
    logits, a1, a2 = torch.randn(3, 4, 6).unbind(0)
    y = torch.tensor([0, 5, 2, 3])
    ce = F.cross_entropy
    assert GOOGLENET_AUX_WEIGHT == 0.3 and INCEPTION_V3_AUX_WEIGHT == 0.4
    expected = ce(logits, y) + 0.3 * ce(a1, y) + 0.3 * ce(a2, y)
    torch.testing.assert_close(aux_loss((logits, a1, a2), y), expected)
    torch.testing.assert_close(aux_loss((logits, a1), y, weights=0.4), ce(logits, y) + 0.4 * ce(a1, y))
    torch.testing.assert_close(aux_loss((logits, a1, a2), y, weights=(0.1, 0.2)),
                               ce(logits, y) + 0.1 * ce(a1, y) + 0.2 * ce(a2, y))
    # eval-mode output (the logits alone): the plain loss
    torch.testing.assert_close(aux_loss(logits, y), ce(logits, y))
    with pytest.raises(ValueError, match="2 auxiliary outputs but 1 weights"):
        aux_loss((logits, a1, a2), y, weights=[0.3])


def test_label_smoothing_matches_definition():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    eps = 0.1
    q = F.one_hot(y, 10).float() * (1 - eps) + eps / 10
    manual = -(q * F.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, y, eps), manual)
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, y, eps),
                               F.cross_entropy(logits, y, label_smoothing=eps))
    # soft (already one-hot) targets give the same; smoothing 0 is plain cross-entropy
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, F.one_hot(y, 10).float(), eps), manual)
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y))
    assert label_smoothing_cross_entropy(logits, y, eps, reduction="none").shape == (5,)
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothing_cross_entropy(logits, y, 1.0)


def test_inception_rmsprop_paper_settings_and_schedule():
    # the engine's rmsprop: the paper's RMSProp (decay 0.9, eps 1.0, momentum 0.9), lr 0.045 x batch / 32, and
    # the named Inception rule (x0.94 every two epochs) for the step schedule
    cfg = TrainConfig(optimizer="rmsprop", schedule="step", batch=32)
    opt = build_optimizer(nn.Linear(2, 2), cfg, cfg.resolved_lr())
    assert isinstance(opt, torch.optim.RMSprop) and isinstance(opt, RMSpropTF)
    g = opt.param_groups[0]
    assert (g["lr"], g["alpha"], g["eps"], g["momentum"]) == (0.045, 0.9, 1.0, 0.9)
    assert cfg.resolved_schedule() == "inception"
    lrs = [0.045 * lr_factor(e * 5, cfg, 5, 100, 0) for e in range(6)]  # 5 steps per epoch
    assert lrs == pytest.approx([0.045 * 0.94 ** (e // 2) for e in range(6)])
    assert lr_factor(9, cfg, 5, 100, 0) == 1.0 and lr_factor(10, cfg, 5, 100, 0) == pytest.approx(0.94)


def test_default_aux_weight_is_the_papers():
    assert default_aux_weight(backbone_spec("inception_v3")) == INCEPTION_V3_AUX_WEIGHT
    assert default_aux_weight(backbone_spec("googlenet")) == GOOGLENET_AUX_WEIGHT
    assert default_aux_weight(backbone_spec("resnet18")) == GOOGLENET_AUX_WEIGHT


def test_rmsprop_tf_update_rule():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4))
    p0 = p.detach().clone()
    opt = RMSpropTF([p], lr=0.1, alpha=0.9, eps=1.0, momentum=0.5)
    grads = [torch.randn(4) for _ in range(3)]
    ms, mom, ref = torch.ones(4), torch.zeros(4), p0.clone()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.5 * mom + 0.1 * g / torch.sqrt(ms + 1.0)
        ref = ref - mom
    torch.testing.assert_close(p.detach(), ref)


def test_clip_gradients_to_global_norm_two():
    model = nn.Linear(4, 3)
    for q in model.parameters():
        q.grad = torch.full_like(q, 3.0)
    before = math.sqrt(9.0 * sum(q.numel() for q in model.parameters()))
    norm = clip_gradients(model)
    assert float(norm) == pytest.approx(before)
    after = torch.sqrt(sum(q.grad.square().sum() for q in model.parameters()))
    assert float(after) == pytest.approx(2.0, rel=1e-4)
    small = nn.Linear(2, 1)
    for q in small.parameters():
        q.grad = torch.full_like(q, 0.1)
    clip_gradients(small.parameters(), 2.0)
    assert all(torch.allclose(q.grad, torch.full_like(q, 0.1)) for q in small.parameters())


def test_model_ema_update_apply_copy_state_dict():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEma(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()
    model(torch.randn(2, 3, 8, 8))  # moves the BN statistics and num_batches_tracked
    ema.update(model)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert int(ema.shadow["1.num_batches_tracked"]) == 1
    torch.testing.assert_close(ema.shadow["1.running_mean"], 0.1 * model[1].running_mean)

    own = model[0].weight.detach().clone()
    with ema.applied_to(model) as m:
        torch.testing.assert_close(m[0].weight, ema.shadow["0.weight"])
    torch.testing.assert_close(model[0].weight, own)  # restored
    averaged = ema.copy(model)
    assert not averaged.training and averaged is not model
    torch.testing.assert_close(averaged[0].weight, ema.shadow["0.weight"])

    again = ModelEma(model, decay=0.5)
    again.load_state_dict(ema.state_dict())
    assert again.decay == 0.9 and again.num_updates == 1
    torch.testing.assert_close(again.shadow["0.weight"], ema.shadow["0.weight"])
    with pytest.raises(ValueError, match="do not match"):
        ModelEma(nn.Linear(2, 2)).load_state_dict(ema.state_dict())


def test_model_ema_warmup_decay():
    ema = ModelEma(nn.Linear(2, 2), decay=0.9999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.num_updates = 10**6
    assert ema.current_decay() == pytest.approx(0.9999)
    with pytest.raises(ValueError, match="decay"):
        ModelEma(nn.Linear(2, 2), decay=1.0)
