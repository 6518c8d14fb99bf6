"""timm ``resnetv2_50/101`` keys -> vertebra.backbones.preact_resnet (``preact_resnet50/101``).

timm's resnetv2 is the same network up to one order: its first pre-activation
(``stages.0.blocks.0.norm1``) runs after the stem's max-pool, ours, as in the paper, before it
(the stem's BN). Built with ``stem_pool_first=True`` ours runs timm's order and the outputs are equal
for any weights (``reference.twins.TWIN_BUILD_KWARGS``; the published weights carry that argument).
timm's basic-block ``resnetv2_18/34`` differ once more (the first unit's identity shortcut takes the
pooled stem before its BN-ReLU), which no argument of ours reproduces;
in the paper's order they agree only while every BN scale is positive, so the pairs are not among the
networks' references (``create_backbone(weights=...)`` does not read a resnetv2 checkpoint as its own).
"""

from __future__ import annotations

import re

from . import keymap


@keymap("timm", "preact_resnet50", "preact_resnet101")
def preact_resnet_timm(sd, model):
    out = {}
    for k, v in sd.items():
        if k == "stem.conv.weight":
            k = "conv1.conv.weight"
        elif k.startswith("stages.0.blocks.0.norm1."):
            k = "conv1.bn." + k.rsplit(".", 1)[1]
        elif m := re.match(r"stages\.(\d)\.blocks\.0\.norm1\.(.+)$", k):
            k = f"norm{int(m[1])}.{m[2]}"
        elif m := re.match(r"stages\.(\d)\.blocks\.(\d+)\.(.+)$", k):
            rest = m[3].replace("downsample.conv.", "shortcut.")
            rest = re.sub(r"^norm(\d)\.", r"bn\1.", rest)
            k = f"layer{int(m[1]) + 1}.{m[2]}.{rest}"
        elif k.startswith("norm."):
            k = "norm4." + k[len("norm."):]
        elif k == "head.fc.weight":
            v = v.flatten(1)
        out[k] = v
    return out
