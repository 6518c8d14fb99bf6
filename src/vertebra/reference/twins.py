"""Building the torchvision/timm twin of a registered network (random weights, no download)."""

from __future__ import annotations

from torch import nn

# constructor arguments that make the twin the same network as ours
_TWIN_KWARGS: dict[str, dict] = {
    "torchvision:googlenet": {"aux_logits": False, "init_weights": True, "transform_input": False},
    "torchvision:inception_v3": {"aux_logits": False, "init_weights": True, "transform_input": False},
}


#: twins that are our network only with a build argument of ours (not the paper's choice): the weights of
#: such a twin are loaded into the network built with these arguments (``Weights.build_kwargs``)
TWIN_BUILD_KWARGS: dict[tuple[str, str], dict] = {
    # timm's MobileNet v1 uses ReLU6, the paper ReLU
    ("mobilenet_v1", "timm:mobilenetv1_100"): {"act": "relu6"},
    # timm's ResNetV2 max-pools before the first pre-activation, the paper after the stem's BN-ReLU (its basic
    # resnetv2_18/34 also take the first unit's shortcut before that BN: not ours with any argument)
    ("preact_resnet50", "timm:resnetv2_50"): {"stem_pool_first": True},
    ("preact_resnet101", "timm:resnetv2_101"): {"stem_pool_first": True},
}


def has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def build_twin(reference: str, num_classes: int = 1000) -> nn.Module:
    """``reference`` is a spec's twin, "torchvision:NAME" or "timm:NAME"."""
    source, name = reference.split(":", 1)
    kwargs = dict(_TWIN_KWARGS.get(reference, {}))
    if source == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if source == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ImportError(f"{reference} needs timm: pip install timm (or vertebra[dev])") from exc
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown twin source {source!r} in {reference!r}")


def in_twin_order(state_dict, reference: str, num_classes: int = 1000) -> dict:
    """``state_dict`` with its keys in the twin's registration order (the by-order key maps pair tensors in
    that order; a safetensors file stores its keys sorted, not in the order the model registers them). The
    twin is built on the meta device (no memory, no weights); keys the twin does not have keep their order
    at the end."""
    import torch

    with torch.device("meta"):
        order = list(build_twin(reference, num_classes=num_classes).state_dict())
    out = {k: state_dict[k] for k in order if k in state_dict}
    out.update((k, v) for k, v in state_dict.items() if k not in out)
    return out
