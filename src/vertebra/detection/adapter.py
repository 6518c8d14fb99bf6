"""Any feature extractor as a detector backbone: timm ``features_only`` models, torchvision feature extractors.

:class:`BackboneAdapter` wraps a module whose ``forward(x)`` returns feature levels (a list, tuple or dict of
``N x C x H x W`` tensors) and gives the detector what it takes from a vertebra :class:`~vertebra.Backbone`:
``stage_info`` (one :class:`~vertebra.FeatureInfo` per returned level: name, channels, stride), the selection of
levels (``configure_outputs``, by stride), ``forward_levels`` and ``stages`` (what ``freeze_stages`` reads).

Where the levels' channels and strides come from, first that applies:

1. ``strides=`` (and optionally ``channels=``) given by the caller;
2. the module's ``feature_info`` with timm's ``channels()`` / ``reduction()`` (every timm ``features_only``
   model);
3. one forward pass of a zero image (``sample_size`` pixels square, eval mode, no gradient) at construction: a
   level's stride is the input size over its size (rounded to a power of two), its channels its ``C``
   (a torchvision ``create_feature_extractor`` model, any module returning levels).

The levels are ordered finest first (a dict's are sorted by stride; ties keep their order) and must have
distinct strides. The wrapped module always computes every level it returns: selecting fewer
(``configure_outputs``) drops the others after the fact, it does not stop the network early.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo, FeatureInfoList

__all__ = ["BackboneAdapter", "as_backbone"]


def _first(module: nn.Module, kind: type) -> nn.Module | None:
    return next((m for m in module.modules() if isinstance(m, kind)), None)


def _as_list(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        raise TypeError("the backbone module returns one tensor, not feature levels: give a timm model built with "
                        "features_only=True, a torchvision create_feature_extractor(model, return_nodes={...}), or "
                        "any module returning a list / tuple / dict of N x C x H x W tensors")
    levels = list(out.values()) if isinstance(out, dict) else list(out)
    if not levels or not all(isinstance(t, Tensor) and t.dim() == 4 for t in levels):
        raise TypeError("the backbone module must return a non-empty list / tuple / dict of N x C x H x W tensors; "
                        f"got {[getattr(t, 'shape', type(t)) for t in levels]}")
    return levels


class BackboneAdapter(Backbone):
    """A module returning feature levels, as a vertebra Backbone (``features_only``; no classifier).

    ``module``: a timm ``features_only`` model, a torchvision feature extractor, or any module whose forward
    returns a list / tuple / dict of ``N x C x H x W`` levels. ``strides`` / ``channels``: the levels' (in the
    order the module returns them); inferred when not given (see the module docstring). ``in_chans``: the input
    channels (default: the first convolution's, else 3). ``name``: for messages and the detector's name
    (default: timm's architecture name, else the module's class name, lower case). ``mean`` / ``std``: the
    normalisation its weights expect (default: timm's ``pretrained_cfg``, else ImageNet's).

    ``stages(x)`` yields every returned level (``freeze_stages`` counts them: ``trainable_stages`` applies per
    returned level, the parameters before the first level belonging to it).
    """

    def __init__(self, module: nn.Module, strides: Sequence[int] | None = None, channels: Sequence[int] | None = None,
                 *, in_chans: int | None = None, name: str | None = None, mean=None, std=None,
                 sample_size: int = 256) -> None:
        conv = _first(module, nn.Conv2d)
        chans = int(in_chans if in_chans is not None else (conv.in_channels if conv is not None else 3))
        super().__init__(chans, 0)
        self.body = module
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None) or {}
        self._name = str(name or cfg.get("architecture") or type(module).__name__.lower())
        if mean is None and cfg.get("mean") is not None:
            mean, std = cfg.get("mean"), cfg.get("std")
        self.normalization = (tuple(mean), tuple(std)) if mean is not None and std is not None else None
        names: list[str] | None = None
        info = getattr(module, "feature_info", None)
        if strides is None and channels is None and hasattr(info, "channels") and hasattr(info, "reduction"):
            channels, strides = list(info.channels()), list(info.reduction())
            names = list(info.module_name()) if hasattr(info, "module_name") else None
        if strides is None or channels is None:
            probe_ch, probe_st, probe_names = self._probe(sample_size)
            channels = probe_ch if channels is None else channels
            strides = probe_st if strides is None else strides
            names = names or probe_names
        channels, strides = [int(c) for c in channels], [int(s) for s in strides]
        if len(channels) != len(strides):
            raise ValueError(f"{self._name}: {len(strides)} strides for {len(channels)} levels")
        if names is None or len(names) != len(strides):
            names = [f"level{i}" for i in range(len(strides))]
        #: the returned levels, finest first (stable sort: the module's order where strides are equal)
        self._order = tuple(sorted(range(len(strides)), key=lambda i: strides[i]))
        ordered = [strides[i] for i in self._order]
        if any(b <= a for a, b in zip(ordered, ordered[1:])):
            raise ValueError(f"{self._name}: the levels' strides {strides} are not distinct; return one level per "
                             f"stride (e.g. timm's out_indices, torchvision's return_nodes)")
        self.stage_info = FeatureInfoList(FeatureInfo(names[i], channels[i], strides[i]) for i in self._order)
        self.min_input_size = max(32, ordered[-1])
        self.configure_outputs(features_only=True)

    def _probe(self, size: int) -> tuple[list[int], list[int], list[str] | None]:
        """One forward pass of a zero image: the levels' channels and strides (powers of two)."""
        module = self.body
        ref = next(iter(module.parameters()), None)
        if ref is None:
            ref = next(iter(module.buffers()), None)
        kw = {"device": ref.device, "dtype": ref.dtype if ref.is_floating_point() else None} if ref is not None else {}
        x = torch.zeros(1, self.in_chans, size, size, **kw)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module(x)
        finally:
            module.train(was_training)
        keys = [str(k) for k in out] if isinstance(out, dict) else None
        levels = _as_list(out)
        strides = [2 ** round(math.log2(size / t.shape[-2])) for t in levels]
        return [int(t.shape[1]) for t in levels], strides, keys

    @property
    def name(self) -> str:
        return self._name

    def _levels(self, x: Tensor) -> list[Tensor]:
        levels = _as_list(self.body(x))
        if len(levels) != len(self._order):
            raise RuntimeError(f"{self._name} returned {len(levels)} levels, {len(self._order)} were declared")
        return [levels[i] for i in self._order]

    def stages(self, x: Tensor) -> Iterator[Tensor]:
        yield from self._levels(x)

    def forward_levels(self, x: Tensor) -> list[Tensor]:
        self.check_input(x)
        levels = self._levels(x)
        return [levels[i] for i in self._selected()]


def as_backbone(backbone: nn.Module, **kwargs) -> Backbone:
    """A vertebra Backbone as it is; any other module wrapped in a :class:`BackboneAdapter` (``kwargs``: its)."""
    if isinstance(backbone, Backbone):
        if kwargs:
            raise ValueError(f"{', '.join(kwargs)} describe a module's levels: a vertebra Backbone has its own")
        return backbone
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a registered name, a vertebra Backbone or an nn.Module returning feature "
                        f"levels, got {type(backbone).__name__}")
    return BackboneAdapter(backbone, **kwargs)
