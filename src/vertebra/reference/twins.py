"""Building the torchvision/timm twin of a registered network (random weights, no download)."""

from __future__ import annotations

from torch import nn

# constructor arguments that make the twin the same network as ours
_TWIN_KWARGS: dict[str, dict] = {
    "torchvision:googlenet": {"aux_logits": False, "init_weights": True, "transform_input": False},
    "torchvision:inception_v3": {"aux_logits": False, "init_weights": True, "transform_input": False},
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
