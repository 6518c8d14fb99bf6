"""torchvision RetinaNet keys (``retinanet_resnet50_fpn`` and ``_v2``) -> vertebra.detection.

torchvision: ``backbone.body.*`` (the ResNet, as in ``resnet50``), ``backbone.fpn.inner_blocks.i``
/ ``layer_blocks.i`` / ``extra_blocks.p6|p7``, ``head.classification_head.conv.i.j`` +
``cls_logits``, ``head.regression_head.conv.i.j`` + ``bbox_reg``. vertebra: ``net.backbone.*``
(converted by the backbone's own torchvision key map), ``net.fpn.lateral.i`` / ``output.i`` /
``extra.j``, ``net.head.cls_tower.i.j`` + ``cls_logits``, ``net.head.box_tower.i.j`` + ``bbox_pred``.
The pre-v2 layout of torchvision's checkpoints (``conv.2i.weight``, ``inner_blocks.i.weight``) is
read too. BatchNorm's ``num_batches_tracked`` is added or dropped as the model's BN kind needs.
"""

import re

import torch

from . import find_keymap, keymap, rename

_RULES = [
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"net.fpn.lateral.\1.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", r"net.fpn.output.\1.\2"),
    (r"^backbone\.fpn\.extra_blocks\.p6\.", "net.fpn.extra.0."),
    (r"^backbone\.fpn\.extra_blocks\.p7\.", "net.fpn.extra.1."),
    (r"^head\.classification_head\.conv\.(\d+)\.(\d+)\.", r"net.head.cls_tower.\1.\2."),
    (r"^head\.classification_head\.cls_logits\.", "net.head.cls_logits."),
    (r"^head\.regression_head\.conv\.(\d+)\.(\d+)\.", r"net.head.box_tower.\1.\2."),
    (r"^head\.regression_head\.bbox_reg\.", "net.head.bbox_pred."),
]
_V1_HEAD = re.compile(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$")


@keymap("torchvision", "retinanet_*_fpn", detector=True)
def retinanet_keys(sd, model):
    body, rest = {}, {}
    for k, v in sd.items():
        if k.startswith("backbone.body."):
            body[k[len("backbone.body."):]] = v
        else:
            m = _V1_HEAD.match(k)
            rest[f"{m.group(1)}.{int(m.group(2)) // 2}.0.{m.group(3)}" if m else k] = v
    backbone = model.net.backbone
    convert = find_keymap("torchvision", backbone.name)
    if convert is None:
        raise ValueError(f"no torchvision key map for the backbone {backbone.name!r} of {model.name}")
    out = {f"net.backbone.{k}": v for k, v in convert(body, backbone).items()}
    out.update(rename(rest, _RULES))
    own = model.state_dict()
    for k in list(out):
        if k.endswith(".num_batches_tracked") and k not in own:
            del out[k]
    for k in own:
        if k.endswith(".num_batches_tracked") and k not in out:
            out[k] = torch.zeros((), dtype=torch.long)
    return out
