"""torchvision and timm MobileNet v1/v2 keys -> vertebra.backbones.mobilenet_v1 / mobilenet_v2.

The twins (torchvision ``mobilenet_v2``; timm ``mobilenetv1_100`` (ReLU6: build ours with
``act="relu6"``) and ``mobilenetv2_*``) hold the same tensors in the same order; the body and
the head (timm ``conv_head``/``bn2``/``classifier``, torchvision ``features.18``/``classifier``)
are paired tensor by tensor.
"""

from __future__ import annotations

from . import keymap
from .squeezenet import pair_by_order


@keymap("timm", "mobilenet_v1", "mobilenet_v1_*")
def mobilenet_v1_timm(sd, model):
    return pair_by_order(sd, model, ("classifier.",))


@keymap("torchvision", "mobilenet_v2")
def mobilenet_v2_torchvision(sd, model):
    return pair_by_order(sd, model, ("features.18.", "classifier."))


@keymap("timm", "mobilenet_v2", "mobilenet_v2_*")
def mobilenet_v2_timm(sd, model):
    return pair_by_order(sd, model, ("conv_head.", "bn2.", "classifier."))
