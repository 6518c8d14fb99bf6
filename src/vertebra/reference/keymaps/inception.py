"""torchvision/timm GoogLeNet, Inception-v3, Inception-v4 and Inception-ResNet-v2 keys ->
vertebra.backbones.{googlenet, inception_v3, inception_v4}.

The bodies are the same tensors in the same order (vertebra builds the branches of every
module in the order of the twins), so they pair by position with every shape checked; the
classifier renames to ``head.fc`` and the auxiliary classifiers pair by position with
``aux_heads`` when the model has them (a checkpoint's auxiliary weights are dropped when the
model was built without ``aux_logits``).
"""

from __future__ import annotations

from . import by_order, keymap

_HEADS = ("head.", "aux_heads.")


def pair_by_order(sd, model, fc: str, aux: tuple[str, ...] = ()) -> dict:
    """``fc``: the twin's classifier prefix; ``aux``: its auxiliary-classifier prefixes."""
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    fc_keys = {k: v for k, v in sd.items() if k.startswith(fc)}
    aux_keys = {k: v for k, v in sd.items() if aux and k.startswith(aux)}
    body = {k: v for k, v in sd.items() if k not in fc_keys and k not in aux_keys}
    out = by_order(body, [k for k in own if not k.startswith(_HEADS)], shapes)
    for k, v in fc_keys.items():
        out["head.fc." + k[len(fc):]] = v
    own_aux = [k for k in own if k.startswith("aux_heads.")]
    if own_aux and aux_keys:
        out.update(by_order(aux_keys, own_aux, shapes))
    return out


@keymap("torchvision", "googlenet", "googlenet_tv")
def googlenet_keys(sd, model):
    return pair_by_order(sd, model, "fc.", ("aux1.", "aux2."))


@keymap("torchvision", "inception_v3")
@keymap("timm", "inception_v3")
def inception_v3_keys(sd, model):
    return pair_by_order(sd, model, "fc.", ("AuxLogits.",))


@keymap("timm", "inception_v4")
def inception_v4_keys(sd, model):
    return pair_by_order(sd, model, "last_linear.")


@keymap("timm", "inception_resnet_v2")
def inception_resnet_v2_keys(sd, model):
    return pair_by_order(sd, model, "classif.")
