"""torchvision ``mnasnet*`` and timm ``mnasnet_*`` / ``semnasnet_*`` keys -> vertebra.backbones.mnasnet
(same tensors, same order; the 1x1 conv to 1280 and the classifier form the head)."""

from __future__ import annotations

from . import keymap
from .squeezenet import pair_by_order


@keymap("torchvision", "mnasnet_b1", "mnasnet_b1_*")
def mnasnet_torchvision(sd, model):
    return pair_by_order(sd, model, ("layers.14.", "layers.15.", "classifier."))


@keymap("timm", "mnasnet_a1", "mnasnet_b1", "mnasnet_b1_*")
def mnasnet_timm(sd, model):
    return pair_by_order(sd, model, ("conv_head.", "bn2.", "classifier."))
