"""torchvision VGG keys -> vertebra.backbones.vgg.

torchvision numbers the layers of ``features`` in order: each convolution, its BatchNorm (``_bn``
variants), its ReLU, and a max-pool after each block. The map walks the vertebra model's blocks
in the same order to pair ``features.N`` with ``block{b}.conv{b}_{i}.conv`` / ``.bn``.
"""

from . import keymap, rename


def _rules(model) -> list[tuple[str, str]]:
    rules = []
    idx = 0
    for b, block in enumerate(model.blocks, start=1):
        for name, layer in block.named_children():
            rules.append((rf"^features\.{idx}\.", f"block{b}.{name}.conv."))
            if "bn" in layer._modules:
                rules.append((rf"^features\.{idx + 1}\.", f"block{b}.{name}.bn."))
                idx += 3  # conv, bn, relu
            else:
                idx += 2  # conv, relu
        idx += 1  # max-pool
    rules += [(r"^classifier\.0\.", "head.fc6."), (r"^classifier\.3\.", "head.fc7."), (r"^classifier\.6\.", "head.fc.")]
    return rules


@keymap("torchvision", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")
def vgg_keys(sd, model):
    return rename(sd, _rules(model))
