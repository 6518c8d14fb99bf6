"""Frozen BatchNorm, freezing the first backbone stages, and folding frozen BN for inference.

- ``convert_frozen_bn(module)`` replaces every ``nn.BatchNorm2d`` by a frozen one (statistics and
  affine parameters become buffers, copied over), as detection fine-tuning does with batches of
  one or two images per device. The replacement is a ``torchvision.ops.FrozenBatchNorm2d`` (same
  state_dict keys) whose forward is one fused ``batch_norm`` call in inference form rather than
  torchvision's four broadcast operations: same values, one pass over the tensor, forward and
  backward.
- ``freeze_stages(backbone, trainable_stages)`` stops the gradient of the parameters of every
  stage but the last ``trainable_stages`` (torchvision's ``trainable_backbone_layers``: of
  ResNet's five stages conv1, layer1 ... layer4, 3 leaves layer2-4 trainable). The stages are
  every stage of the network (``backbone.stage_info``, what ``backbone.stages(x)`` yields), not
  only the levels the detector takes; for an adapted timm / torchvision module
  (``adapter.BackboneAdapter``) they are the levels it returns. Which parameters belong to the
  first stages is found from the network itself (the parameters that feed the output of stage
  k), not from module names, so it works for every backbone.
- ``fold_frozen_bn_live(module)`` makes every ``conv -> frozen BN`` pair (``ConvBnAct``) run as
  one convolution whose weight is folded at each call: the same function and gradients, the
  same state_dict, one pass less over the activation forward and backward (training too).
- For inference, ``layers.conv_bn.fold_bn_pairs`` (``prepare_inference``) folds frozen BatchNorms for
  good, like eval-mode ones (the BN keys leave the state_dict).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as _TVFrozenBatchNorm2d

__all__ = ["FrozenBatchNorm2d", "convert_frozen_bn", "freeze_stages", "fold_frozen_bn_live", "num_stages"]


class FrozenBatchNorm2d(_TVFrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d computed by one ``F.batch_norm(training=False)`` call."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def convert_frozen_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d holding its statistics."""
    if isinstance(module, nn.BatchNorm2d) and hasattr(module, "act") and hasattr(module, "drop"):
        # timm's BatchNormAct2d (BN + activation in one module): timm's own frozen BN + act keeps the activation
        from timm.layers import freeze_batch_norm_2d

        return freeze_batch_norm_2d(module)
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        dev = module.running_mean.device if module.running_mean is not None else None
        return frozen.to(dev) if dev is not None else frozen
    for name, child in list(module.named_children()):
        new = convert_frozen_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def stage_parameters(backbone, num_stages: int) -> set[str]:
    """Names of the parameters that the outputs of the first ``num_stages`` stages depend on."""
    if num_stages <= 0:
        return set()
    named = [(n, p) for n, p in backbone.named_parameters()]
    size = max(getattr(backbone, "min_input_size", 32), 64)
    was_training = backbone.training
    backbone.eval()
    flags = [p.requires_grad for _, p in named]
    try:
        for _, p in named:
            p.requires_grad_(True)
        x = torch.zeros(1, backbone.in_chans, size, size, device=named[0][1].device if named else None)
        outs = []
        with torch.enable_grad():
            for i, feat in enumerate(backbone.stages(x)):
                outs.append(feat)
                if i == num_stages - 1:
                    break
            total = sum(o.float().sum() for o in outs)
            grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    finally:
        for (_, p), f in zip(named, flags):
            p.requires_grad_(f)
        backbone.train(was_training)
    return {n for (n, _), g in zip(named, grads) if g is not None}


def num_stages(backbone) -> int:
    """How many stages ``backbone.stages(x)`` yields (every stage, whatever levels are selected)."""
    info = getattr(backbone, "stage_info", None)
    return len(info if info is not None else backbone.feature_info)


def freeze_stages(backbone, trainable_stages: int) -> list[str]:
    """Freeze every stage but the last ``trainable_stages``; returns the frozen parameter names."""
    n = num_stages(backbone)
    if not 0 <= trainable_stages <= n:
        raise ValueError(f"trainable_stages must be in [0, {n}] for {backbone.name} ({n} stages), "
                         f"got {trainable_stages}")
    if trainable_stages == 0:
        names = {name for name, _ in backbone.named_parameters()}
    else:
        names = stage_parameters(backbone, n - trainable_stages)
    for name, p in backbone.named_parameters():
        if name in names:
            p.requires_grad_(False)
    return sorted(names)


class _ConvFrozenBN(nn.Sequential):
    """``conv -> frozen BN [-> act]`` computed as one convolution with the BN folded on the fly.

    The children (and so the state_dict keys) stay as they were; the folded weight is
    ``conv.weight * scale`` recomputed at every call, so gradients reach ``conv.weight`` exactly
    as through the unfused pair while the activation is read and written once instead of twice.
    """

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self[0], self[1]
        if not isinstance(bn, _TVFrozenBatchNorm2d):  # folded for good by layers.conv_bn.fold_bn_pairs
            return super().forward(x)
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        w = conv.weight * scale.reshape(-1, 1, 1, 1)
        if x.is_contiguous(memory_format=torch.channels_last):
            w = w.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, w, shift, conv.stride, conv.padding, conv.dilation, conv.groups)
        for m in list(self)[2:]:
            y = m(y)
        return y


def fold_frozen_bn_live(module: nn.Module) -> int:
    """Make every ``nn.Sequential`` that starts ``conv, FrozenBatchNorm2d`` fold the BN on the fly.

    Exact (same function and gradients), state_dict unchanged; returns how many were changed.
    """
    count = 0
    for name, child in list(module.named_children()):
        if (type(child) is not _ConvFrozenBN and isinstance(child, nn.Sequential) and len(child) >= 2
                and type(child[0]) is nn.Conv2d and child[0].padding_mode == "zeros"
                and isinstance(child[1], _TVFrozenBatchNorm2d)):
            new = _ConvFrozenBN()
            for k, m in child._modules.items():
                new.add_module(k, m)
            setattr(module, name, new)
            count += 1
        else:
            count += fold_frozen_bn_live(child)
    return count
