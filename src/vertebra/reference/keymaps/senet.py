"""timm ``legacy_seresnet*``/``legacy_seresnext*``/``legacy_senet154`` keys (Cadene's port of the
Caffe SENets) -> vertebra.backbones.senet."""

from . import keymap, rename

_BLOCKS = [
    (r"^(layer\d\.\d+)\.conv(\d)\.weight$", r"\1.conv\2.conv.weight"),
    (r"^(layer\d\.\d+)\.bn(\d)\.", r"\1.conv\2.bn."),
    (r"^(layer\d\.\d+)\.se_module\.", r"\1.se."),
    (r"^(layer\d\.\d+)\.downsample\.0\.", r"\1.downsample.conv."),
    (r"^(layer\d\.\d+)\.downsample\.1\.", r"\1.downsample.bn."),
    (r"^last_linear\.", "head.fc."),
]

_STEM_7X7 = [
    (r"^layer0\.conv1\.", "stem.conv."),
    (r"^layer0\.bn1\.", "stem.bn."),
]

_STEM_3X3 = [
    (r"^layer0\.conv1\.", "stem.0.conv."),
    (r"^layer0\.bn1\.", "stem.0.bn."),
    (r"^layer0\.conv2\.", "stem.1.conv."),
    (r"^layer0\.bn2\.", "stem.1.bn."),
    (r"^layer0\.conv3\.", "stem.2.conv."),
    (r"^layer0\.bn3\.", "stem.2.bn."),
]


@keymap("timm", "se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50_32x4d", "se_resnext101_32x4d")
def seresnet_keys(sd, model):
    return rename(sd, _STEM_7X7 + _BLOCKS)


@keymap("timm", "senet154")
def senet154_keys(sd, model):
    return rename(sd, _STEM_3X3 + _BLOCKS)
