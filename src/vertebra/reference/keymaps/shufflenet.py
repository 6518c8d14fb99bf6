"""torchvision ShuffleNet V2 keys -> vertebra.backbones.shufflenet_v2 (same tensors, same order;
torchvision's conv5 and fc form the head: ``head.conv`` and ``head.fc``)."""

from __future__ import annotations

from . import keymap
from .squeezenet import pair_by_order


@keymap("torchvision", "shufflenet_v2_x*")
def shufflenet_v2_keys(sd, model):
    return pair_by_order(sd, model, ("conv5.", "fc."))
