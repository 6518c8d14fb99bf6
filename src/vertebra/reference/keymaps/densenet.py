"""torchvision and timm DenseNet keys -> vertebra.backbones.densenet.

Both store the same names (``features.denseblockN.denselayerM.normK/convK``,
``features.transitionN``, ``features.norm5``, ``classifier``); only the stem and the
classifier move. torchvision's published files keep the names of its first DenseNet
(``denselayerM.norm.1``, ``conv.2``: module names with dots), which torchvision renames when it
loads them; the first rule does the same.
"""

from . import keymap, rename

_RULES = [
    (r"^features\.(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\."
     r"(weight|bias|running_mean|running_var|num_batches_tracked)$", r"\1\2.\3"),
    (r"^features\.conv0\.", "conv0.conv."),
    (r"^features\.norm0\.", "conv0.bn."),
    (r"^features\.", ""),
    (r"^classifier\.", "head.fc."),
]


@keymap("torchvision", "densenet121", "densenet169", "densenet201", "densenet161")
@keymap("timm", "densenet121", "densenet169", "densenet201", "densenet161")
def densenet_keys(sd, model):
    return rename(sd, _RULES)
