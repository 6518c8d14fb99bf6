"""timm DPN keys (Cadene's port of the MXNet models) -> vertebra.backbones.dpn.

timm keeps a flat ``features`` sequence (``conv1_1``, ``conv{stage}_{block}``, ``conv5_bn_ac``)
and a 1x1-convolution classifier; vertebra has ``stem``, ``stageN.M`` and a linear classifier
(the same weights, flattened).
"""

import re

from . import keymap

_RULES = [
    (r"^features\.conv1_1\.", "stem."),
    (r"^features\.conv5_bn_ac\.bn\.", "final_bn."),
    (r"\.c1x1_w_s[12]\.", ".proj."),
    (r"\.c1x1_a\.", ".conv1."),
    (r"\.c3x3_b\.", ".conv2."),
    (r"\.c1x1_c\.", ".conv3."),
    (r"^classifier\.", "head.fc."),
]
_BLOCK = re.compile(r"^features\.conv([2-5])_(\d+)\.")


def _block(m: re.Match) -> str:
    return f"stage{int(m.group(1)) - 1}.{int(m.group(2)) - 1}."


@keymap("timm", "dpn68", "dpn92", "dpn98", "dpn107", "dpn131")
def dpn_keys(sd, model):
    sd = {_BLOCK.sub(_block, k): v for k, v in sd.items()}
    out = {}
    # several rules apply to one key (the block's name, then its layer's)
    for k, v in sd.items():
        for pat, rep in _RULES:
            k = re.sub(pat, rep, k)
        out[k] = v
    w = out.get("head.fc.weight")
    if w is not None and w.dim() == 4:
        out["head.fc.weight"] = w.flatten(1)
    return out
