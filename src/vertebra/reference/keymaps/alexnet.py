"""torchvision AlexNet keys -> vertebra.backbones.alexnet (the single-tower ``alexnet_tv``)."""

from . import keymap, rename

_RULES = [
    (r"^features\.0\.", "conv1.conv."),
    (r"^features\.3\.", "conv2.conv."),
    (r"^features\.6\.", "conv3.conv."),
    (r"^features\.8\.", "conv4.conv."),
    (r"^features\.10\.", "conv5.conv."),
    (r"^classifier\.1\.", "head.fc6."),
    (r"^classifier\.4\.", "head.fc7."),
    (r"^classifier\.6\.", "head.fc."),
]


@keymap("torchvision", "alexnet_tv")
def alexnet_keys(sd, model):
    return rename(sd, _RULES)
