"""torchvision and timm ResNet/ResNeXt/WRN keys -> vertebra.backbones.resnet."""

from . import keymap, rename

_RULES = [
    (r"^conv1\.weight$", "conv1.conv.weight"),
    (r"^bn1\.", "conv1.bn."),
    (r"^(layer\d\.\d+)\.conv(\d)\.weight$", r"\1.conv\2.conv.weight"),
    (r"^(layer\d\.\d+)\.bn(\d)\.", r"\1.conv\2.bn."),
    (r"^(layer\d\.\d+)\.downsample\.0\.", r"\1.downsample.conv."),
    (r"^(layer\d\.\d+)\.downsample\.1\.", r"\1.downsample.bn."),
    (r"^fc\.", "head.fc."),
]


@keymap("torchvision", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet152_sd",
        "resnext50_32x4d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
@keymap("timm", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet152_sd",
        "resnext50_32x4d", "resnext101_32x4d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
def resnet_keys(sd, model):
    return rename(sd, _RULES)
