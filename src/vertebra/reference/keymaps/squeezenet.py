"""torchvision SqueezeNet keys -> vertebra.backbones.squeezenet.

Also home of :func:`pair_by_order`, which the other efficient-network key maps
(mobilenet, shufflenet, mnasnet) share: the twins store the same tensors in the same order
under index-based names, so the body and the head are paired tensor by tensor, separately,
and a features_only model (no head) simply leaves the twin's head tensors under their own
names for the loader to drop.
"""

from __future__ import annotations

from . import by_order, keymap


def pair_by_order(sd, model, src_head_prefixes: tuple[str, ...]) -> dict:
    """Pair the twin's body tensors with the model's body, and its head tensors (keys starting
    with ``src_head_prefixes``) with the model's ``head.`` tensors, in state_dict order."""
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items()}
    src_body = {k: v for k, v in sd.items() if not k.startswith(src_head_prefixes)}
    src_head = {k: v for k, v in sd.items() if k.startswith(src_head_prefixes)}
    out = by_order(src_body, [k for k in own if not k.startswith("head.")], shapes)
    dst_head = [k for k in own if k.startswith("head.")]
    if dst_head:
        out.update(by_order(src_head, dst_head, shapes))
    else:  # features_only: hand the head over under a head. name; the loader drops it
        out.update({f"head.{k}": v for k, v in src_head.items()})
    return out


@keymap("torchvision", "squeezenet1_0", "squeezenet1_1", "squeezenet1_0_simple_bypass")
def squeezenet_keys(sd, model):
    return pair_by_order(sd, model, ("classifier.",))
