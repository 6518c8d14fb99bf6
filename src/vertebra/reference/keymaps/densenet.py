"""torchvision and timm DenseNet keys -> vertebra.backbones.densenet.

Both store the same names (``features.denseblockN.denselayerM.normK/convK``,
``features.transitionN``, ``features.norm5``, ``classifier``); only the stem and the
classifier move.
"""

from . import keymap, rename

_RULES = [
    (r"^features\.conv0\.", "conv0.conv."),
    (r"^features\.norm0\.", "conv0.bn."),
    (r"^features\.", ""),
    (r"^classifier\.", "head.fc."),
]


@keymap("torchvision", "densenet121", "densenet169", "densenet201", "densenet161")
@keymap("timm", "densenet121", "densenet169", "densenet201", "densenet161")
def densenet_keys(sd, model):
    return rename(sd, _RULES)
