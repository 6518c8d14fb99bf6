"""CondenseNet.

Huang, Liu, van der Maaten, Weinberger, "CondenseNet: An Efficient DenseNet using Learned Group
Convolutions" (CVPR 2018, arXiv 1711.09224).

A DenseNet with two changes (Sec. 4): full dense connectivity across blocks (a 2x2 average pool
between blocks, no transition convolution or compression) and an exponentially increasing growth
rate; and layers made of

    BN -> ReLU -> 1x1 learned group conv (G groups, condensation factor C, 4k filters)
       -> BN -> ReLU -> 3x3 group conv (G groups, k filters),

whose output is concatenated to the input. The learned group convolution
(``vertebra.layers.learned_group_conv``) prunes its inputs per group during training; at test time
it becomes an index layer, a standard group convolution and a permutation (Fig. 1 right).

Registered networks:

- ``condensenet74_c4_g4`` (ImageNet, Table 5: 4.8M parameters, 529M mult-adds, 26.2% top-1):
  conv 3x3/2 16 (2k_0), five dense blocks of 4-6-8-10-8 layers with growth 8-16-32-64-128 at
  112/56/28/14/7, G = C = 4, final BN-ReLU, global pool, FC. Here 4.773944M and 517M MACs.
  ``condensenet74_c8_g8`` is the G = C = 8 model of the same table (2.9M, 274M as recalled, not in
  the facts table; here 2.935416M, 262M).
- ``condensenet86_cifar`` (CIFAR-10, Sec. 5.1 and the authors' CIFAR recipe ``--stages 14-14-14
  --growth 8-16-32``): conv 3x3 16, three dense blocks of 14 layers with growth 8-16-32 at
  32/16/8, G = C = 4 (86 layers: 84 in the blocks, the stem conv and the classifier); 0.516M
  parameters and 62M MACs here (the paper's table: 0.52M, 65M as recalled).

Compute: the MACs here count convolutions and the classifier (FlopCounterMode). The authors'
counter also counts one operation per ReLU output and per pooled input, which adds about 12M to
the ImageNet models (hence 529M vs 517M and 274M vs 262M: the same absolute gap for both).

Training network vs inference network. The paper's parameter and compute figures are those of
the condensed (test-time) network, and that is what ``create_backbone`` builds by default
(``condensed=True``): its parameter count and MACs are the table's, and it loads the weights of
a trained model after :func:`condense`. ``condensed=False`` builds the training network: full
1x1 convolutions with per-group masks that prune themselves at the paper's schedule as the
training loop reports its progress (:meth:`CondenseNet.set_progress`, 0..1; C-1 condensing
stages in the first half of training), plus ``lasso_loss()`` for the group-lasso penalty.
:func:`condense` turns a (fully condensed) training network into the inference network, with the
same outputs. Both take the same arch kwargs.

The classifier: in the released converted models (and the paper's 4.8M / 529M) the FC layer
also keeps only half its inputs, the ones with the largest summed weight magnitude, chosen by
:func:`condense` (without it the G = C = 4 model has 5.8M parameters). ``condense_fc=False``
keeps the full FC. With the FC condensed, the condensed logits equal those of the training
network whose dropped FC columns are zero; the features are equal in every case.

Features: the dense blocks (ImageNet 48/144/400/1040/2064 channels at s2..s32; CIFAR
128/352/800 at s1/s2/s4); the last one includes the final BN-ReLU.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo
from ..layers.heads import ResettableHead
from ..layers.learned_group_conv import CondensedGroupConv, LearnedGroupConv, condensation_stage
from ..registry import register

_CONDENSE = dict(family="CondenseNet",
                 paper="CondenseNet: An Efficient DenseNet using Learned Group Convolutions (CVPR 2018)",
                 year=2017, arxiv="1711.09224", supports_drop_path=False)


class BnActConv(nn.Sequential):
    """BN -> ReLU -> conv (the pre-activation convolution of DenseNet layers)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, groups: int = 1) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, 1, kernel_size // 2, groups=groups, bias=False)


class CondenseLayer(nn.Module):
    def __init__(self, in_ch: int, growth: int, groups_1x1: int, groups_3x3: int, condense_factor: int,
                 bottleneck: int, condensed: bool, drop_rate: float) -> None:
        super().__init__()
        mid = bottleneck * growth
        if condensed:
            kept = in_ch - (condense_factor - 1) * (in_ch // condense_factor)
            self.conv1 = CondensedGroupConv(in_ch, mid, groups_1x1, kept)
        else:
            self.conv1 = LearnedGroupConv(in_ch, mid, groups_1x1, condense_factor, drop_rate)
        self.conv2 = BnActConv(mid, growth, 3, groups_3x3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.conv2(self.conv1(x))), 1)


class CondensedLinear(nn.Module):
    """Index layer + FC: the classifier of the converted network reads a fixed subset of features."""

    def __init__(self, in_features: int, num_classes: int, keep: int) -> None:
        super().__init__()
        self.register_buffer("index", torch.arange(keep))
        self.fc = nn.Linear(keep, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.index_select(1, self.index))


class CondenseHead(ResettableHead):
    """global average pool -> flatten -> FC (full, or condensed to half its inputs)."""

    def __init__(self, in_ch: int, num_classes: int, condensed_fc: bool) -> None:
        super().__init__()
        self.num_features = in_ch
        self.condensed_fc = bool(condensed_fc)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if num_classes <= 0:
            self.fc = nn.Identity()
        elif condensed_fc:
            self.fc = CondensedLinear(in_ch, num_classes, in_ch // 2)
        else:
            self.fc = nn.Linear(in_ch, num_classes)

    def make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes > 0 and self.condensed_fc:
            return CondensedLinear(self.num_features, num_classes, self.num_features // 2)
        return super().make_classifier(num_classes)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.fc(x)


class CondenseNet(Backbone):
    def __init__(self, layers=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128), groups: int = 4, condense_factor: int = 4,
                 bottleneck: int = 4, stem_stride: int = 2, condensed: bool = True, condense_fc: bool = True,
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__(in_chans, num_classes)
        if len(layers) != len(growth):
            raise ValueError(f"one growth rate per dense block: {len(layers)} blocks, {len(growth)} rates")
        self.arch = dict(layers=tuple(layers), growth=tuple(growth), groups=groups, condense_factor=condense_factor,
                         bottleneck=bottleneck, stem_stride=stem_stride, condense_fc=condense_fc,
                         num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
        self.condensed = condensed
        ch = 2 * growth[0]
        self.stem = nn.Conv2d(in_chans, ch, 3, stem_stride, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)
        for i, (n, k) in enumerate(zip(layers, growth)):
            block = []
            for _ in range(n):
                block.append(CondenseLayer(ch, k, groups, groups, condense_factor, bottleneck, condensed, drop_rate))
                ch += k
            self.add_module(f"block{i + 1}", nn.Sequential(*block))
            self.stage_info.append(FeatureInfo(f"block{i + 1}", ch, stem_stride * 2**i))
        self.norm = nn.BatchNorm2d(ch)
        self.act = nn.ReLU(inplace=True)
        self.head = CondenseHead(ch, num_classes, condensed and condense_fc)
        self.min_input_size = stem_stride * 2 ** (len(layers) - 1)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stages(self, x: Tensor):
        x = self.stem(x)
        blocks = [getattr(self, f"block{i + 1}") for i in range(len(self.stage_info))]
        for i, block in enumerate(blocks):
            if i:
                x = self.pool(x)
            x = block(x)
            if i == len(blocks) - 1:
                x = self.act(self.norm(x))
            yield x

    # -- training-time condensation ---------------------------------------------------
    def learned_group_convs(self) -> list[LearnedGroupConv]:
        return [m for m in self.modules() if isinstance(m, LearnedGroupConv)]

    def set_progress(self, progress: float) -> int:
        """Report training progress (epoch + batch fraction, over the total, in 0..1); the learned
        group convolutions condense when a new stage begins. Returns the current stage."""
        convs = self.learned_group_convs()
        if not convs:
            raise RuntimeError("set_progress needs the training network (condensed=False)")
        stage = condensation_stage(progress, convs[0].condense_factor)
        for m in convs:
            m.condense_to(stage)
        return stage

    def lasso_loss(self) -> Tensor:
        """The group-lasso penalty of every learned group convolution (add lambda * this to the loss)."""
        convs = self.learned_group_convs()
        if not convs:
            return self.stem.weight.new_zeros(())
        return torch.stack([m.lasso_loss() for m in convs]).sum()


@torch.no_grad()
def condense(model: CondenseNet) -> CondenseNet:
    """Convert a trained (fully condensed) training network into the inference network.

    Every learned group convolution becomes index + group conv + permute; with
    ``condense_fc`` the classifier keeps the half of its inputs with the largest summed weight
    magnitude. Returns a new model (in the input's train/eval mode); the input is unchanged.
    """
    if model.condensed:
        raise ValueError("this CondenseNet is already the condensed inference network")
    convs = model.learned_group_convs()
    if any(int(m.stage) < m.condense_factor - 1 for m in convs):
        model.set_progress(1.0)  # apply the remaining condensing stages (the schedule ends at progress 0.5)
    new = CondenseNet(condensed=True, **model.arch).to(model.stem.weight.device, model.stem.weight.dtype)
    new.spec = model.spec
    src = copy.deepcopy(model)
    targets = dict(new.named_modules())
    for name, mod in src.named_modules():
        if isinstance(mod, CondenseLayer):
            target = targets[name]
            target.conv1 = CondensedGroupConv.from_learned(mod.conv1)
            target.conv2.load_state_dict(mod.conv2.state_dict())
    for part in ("stem", "norm"):
        getattr(new, part).load_state_dict(getattr(src, part).state_dict())
    if src.head is not None and isinstance(new.head.fc, CondensedLinear):
        fc = src.head.fc
        keep = new.head.fc.index.numel()
        index = fc.weight.abs().sum(0).topk(keep).indices.sort().values
        new.head.fc.index.copy_(index)
        new.head.fc.fc.weight.copy_(fc.weight[:, index])
        new.head.fc.fc.bias.copy_(fc.bias)
    elif src.head is not None:
        new.head.load_state_dict(src.head.state_dict())
    new.configure_outputs(features_only=model.features_only,
                          out_strides=[model.stage_info[i].stride for i in model.out_indices])
    return new.train(model.training)


@register("condensenet74_c4_g4", **_CONDENSE, groups=4, condense_factor=4)
@register("condensenet74_c8_g8", **_CONDENSE, groups=8, condense_factor=8)
@register("condensenet86_cifar", **_CONDENSE, dataset="cifar10", input_size=(3, 32, 32), layers=(14, 14, 14),
          growth=(8, 16, 32), groups=4, condense_factor=4, stem_stride=1)
def condensenet(**kw) -> CondenseNet:
    return CondenseNet(**kw)
