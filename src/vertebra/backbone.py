"""The backbone contract: ``Backbone``, ``FeatureInfo`` and the stage bookkeeping.

A network subclasses :class:`Backbone`, fills ``self.stage_info`` (one :class:`FeatureInfo` per stage,
strides strictly increasing), puts everything that only classification needs under ``self.head``
(and auxiliary classifiers under ``self.aux_heads``), and writes :meth:`Backbone.stages` by hand:
a generator that yields each stage's output in order. That is the one place where a network says
what its features are, functional steps included (DenseNet's final ReLU, a pre-activation net's
final BN+ReLU).

The model surface follows timm's where the concept is the same:

- ``forward(x)``: the logits (a classifier), or the selected levels, a list (``features_only``);
- ``forward_features(x)``: the unpooled last feature map (one tensor), ``forward_head(x, pre_logits=False)``
  turns it into logits; ``forward_intermediates(x, indices=None, intermediates_only=False, ...)`` gives
  ``(final, [levels])`` or the levels alone; :meth:`Backbone.forward_levels` is the selected levels
  (``out_strides`` / ``out_indices``), stopping the network after the deepest one;
- ``feature_info``: a :class:`FeatureInfoList` of what the model returns (the selected levels of a
  ``features_only`` model, every stage of a classifier), with timm's ``channels()``, ``reduction()``,
  ``module_name()``; ``stage_info`` is always every stage, ``out_feature_info`` always the selected levels;
- ``get_classifier()`` / ``reset_classifier(num_classes)`` (0: the pooled pre-logits features,
  ``head_hidden_size`` wide); ``num_features``: the channels of ``forward_features``' map.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Backbone", "FeatureInfo", "FeatureInfoList", "take_indices"]


@dataclass(frozen=True)
class FeatureInfo:
    """One stage: its (module) name, channels and stride (timm: ``module``, ``num_chs``, ``reduction``)."""

    name: str
    channels: int
    stride: int

    @property
    def num_chs(self) -> int:
        return self.channels

    @property
    def reduction(self) -> int:
        return self.stride

    @property
    def module(self) -> str:
        return self.name

    _TIMM_KEYS = {"num_chs": "channels", "reduction": "stride", "module": "name"}

    def __getitem__(self, key: str):
        """timm's dict entries: ``info["num_chs"]``, ``info["reduction"]``, ``info["module"]`` (or our names)."""
        attr = self._TIMM_KEYS.get(key, key)
        if attr not in ("name", "channels", "stride"):
            raise KeyError(f"{key!r}; a FeatureInfo has num_chs, reduction, module (channels, stride, name)")
        return getattr(self, attr)


class FeatureInfoList(list):
    """A list of :class:`FeatureInfo` with timm's ``FeatureInfo`` queries: ``channels()``, ``reduction()``,
    ``module_name()``, ``get(key)``, ``get_dicts()``; each takes ``idx`` (None: all, a list; an int: that
    entry's value; a sequence of ints: those entries). A slice is a FeatureInfoList too."""

    def __getitem__(self, i):
        out = super().__getitem__(i)
        return FeatureInfoList(out) if isinstance(i, slice) else out

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [f[key] for f in self]
        if isinstance(idx, int):
            return self[idx][key]
        return [self[i][key] for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("channels", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("stride", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("name", idx)

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        """timm's dict view: ``{"module", "num_chs", "reduction"}`` per entry (or the given ``keys``)."""
        keys = tuple(keys) if keys is not None else ("module", "num_chs", "reduction")
        rows = self if idx is None else ([self[idx]] if isinstance(idx, int) else [self[i] for i in idx])
        dicts = [{k: f[k] for k in keys} for f in rows]
        return dicts[0] if isinstance(idx, int) else dicts


def take_indices(n: int, indices: int | Iterable[int] | None) -> list[int]:
    """timm's ``feature_take_indices``: None, all ``n``; an int k, the last k; a sequence, those stage indices
    (negative ones count from the end). Sorted, duplicates dropped; a bad index raises IndexError naming the range."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise IndexError(f"last-n indices={indices} is out of range (1 to {n})")
        return list(range(n - indices, n))
    out = set()
    for i in indices:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"stage index {i} is out of range ({-n} to {n - 1}: the network has {n} stages)")
        out.add(j)
    if not out:
        raise IndexError("no stage index given")
    return sorted(out)


def _reset_linear(owner: nn.Module, attr: str, num_classes: int) -> None:
    """``owner.attr``, a head without its own ``reset``: its last nn.Linear becomes a fresh one (Identity for 0)."""
    head = getattr(owner, attr)
    last = None
    for name, m in head.named_modules():
        if isinstance(m, nn.Linear):
            last = name, m
    if last is None:
        raise NotImplementedError(f"{type(head).__name__} has no reset(num_classes) and no nn.Linear classifier")
    name, old = last
    new = nn.Linear(old.in_features, num_classes) if num_classes > 0 else nn.Identity()
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    if not name:
        setattr(owner, attr, new)
        return
    parent, _, leaf = name.rpartition(".")
    setattr(head.get_submodule(parent) if parent else head, leaf, new)


class Backbone(nn.Module):
    """Base class of every vertebra network."""

    #: attribute names of the modules that exist only for classification
    head_attrs: tuple[str, ...] = ("head", "aux_heads")

    def __init__(self, in_chans: int = 3, num_classes: int = 0) -> None:
        super().__init__()
        self.stage_info = FeatureInfoList()  # every stage; a network fills it (or assigns a list)
        self.features_only = False
        #: the selected stages (indices into ``stage_info``): what ``forward_levels`` returns
        self.out_indices: tuple[int, ...] = ()
        #: the smallest input side the network runs on; a network whose geometry allows less (or
        #: needs more) sets it in its constructor: it is the one place this figure lives
        self.min_input_size = 32
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.spec = None

    # -- to be written by each network ------------------------------------------------
    def stages(self, x: Tensor) -> Iterator[Tensor]:
        """Yield the output of every stage, in order (one per ``stage_info`` entry)."""
        raise NotImplementedError

    def forward_head(self, x: Tensor | Sequence[Tensor], pre_logits: bool = False) -> Tensor:
        """Logits from the last feature map (pooling, dropout, classifier); ``pre_logits=True``: the pooled
        features the classifier reads (``head_hidden_size`` wide). A list of levels gives its last one."""
        if getattr(self, "head", None) is None:
            raise RuntimeError(f"{self.name} was built with features_only=True: it has no classifier head")
        x = x[-1] if isinstance(x, (list, tuple)) else x
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    # -- what the model is and returns ------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name if self.spec is not None else type(self).__name__

    @property
    def stage_info(self) -> FeatureInfoList:
        """Every stage, in order (what :meth:`stages` yields), whatever the selection; ``feature_info`` is what
        the model returns."""
        return self._stage_info

    @stage_info.setter
    def stage_info(self, value: Iterable[FeatureInfo]) -> None:
        self._stage_info = value if isinstance(value, FeatureInfoList) else FeatureInfoList(value)

    @property
    def feature_info(self) -> FeatureInfoList:
        """What the model returns: the selected levels of a ``features_only`` model (``zip(model.feature_info,
        model(x))`` pairs them), every stage of a classifier (what ``forward_intermediates`` can give)."""
        return self.out_feature_info if self.features_only else FeatureInfoList(self.stage_info)

    @feature_info.setter
    def feature_info(self, value: Iterable[FeatureInfo]) -> None:
        # a network written against the earlier contract fills ``self.feature_info``: it is every stage
        self.stage_info = FeatureInfoList(value)

    @property
    def out_feature_info(self) -> FeatureInfoList:
        """The selected levels (``forward_levels``); ``feature_info`` of a ``features_only`` model."""
        return FeatureInfoList(self.stage_info[i] for i in self._selected())

    @property
    def strides(self) -> list[int]:
        """The stride of every stage."""
        return [f.stride for f in self.stage_info]

    @property
    def num_features(self) -> int:
        """The channels of the last feature map (``forward_features``)."""
        return self.stage_info[-1].channels

    @property
    def head_hidden_size(self) -> int:
        """The width of the pooled features the classifier reads (``reset_classifier(0)``'s output): the
        last stage's channels, or the head's own width (MobileNetV2's 1280-wide conv, VGG's fc7)."""
        head = getattr(self, "head", None)
        return int(getattr(head, "num_features", self.num_features)) if head is not None else self.num_features

    def _selected(self) -> tuple[int, ...]:
        return self.out_indices or tuple(range(len(self.stage_info)))

    def configure_outputs(self, *, features_only: bool = False, out_strides=None, out_indices=None) -> None:
        """Select the levels ``forward_levels`` returns (by stride, or by stage index as timm's ``out_indices``,
        negatives counting from the end; default every stage); drop the head for features_only."""
        strides = self.strides
        if any(b <= a for a, b in zip(strides, strides[1:])):
            raise AssertionError(f"{self.name}: feature strides {strides} are not strictly increasing")
        if out_strides is not None and out_indices is not None:
            raise ValueError("give out_strides or out_indices (timm's stage indices), not both")
        if out_indices is not None:
            try:
                idx = tuple(take_indices(len(strides), out_indices))
            except IndexError as e:
                have = ", ".join(f"{i}: {f.name} (s{f.stride})" for i, f in enumerate(self.stage_info))
                raise ValueError(f"{self.name}: out_indices={out_indices!r}: {e}; its stages are {have}") from None
        elif out_strides is None:
            idx = tuple(range(len(strides)))
        else:
            wanted = [int(s) for s in out_strides]
            missing = [s for s in wanted if s not in strides]
            if missing:
                raise ValueError(
                    f"{self.name} has no stage at stride {', '.join(map(str, missing))}; "
                    f"its strides are {', '.join(map(str, strides))}"
                )
            idx = tuple(sorted(strides.index(s) for s in set(wanted)))
        self.out_indices = idx
        self.features_only = bool(features_only)
        if features_only:
            for attr in self.head_attrs:
                if getattr(self, attr, None) is not None:
                    setattr(self, attr, None)

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{self.name} takes a 4-d batch N x C x H x W, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{self.name} was built for {self.in_chans} input channels, got {x.shape[1]}")
        h, w = x.shape[-2], x.shape[-1]
        if h < self.min_input_size or w < self.min_input_size:
            m = self.min_input_size
            raise ValueError(f"{self.name} needs an input of at least {m}x{m} pixels, got {h}x{w}")

    # -- forward passes ---------------------------------------------------------------
    def forward_levels(self, x: Tensor) -> list[Tensor]:
        """The selected levels (``out_feature_info``), finest first; the network stops after the deepest."""
        return self.forward_intermediates(x, self._selected(), intermediates_only=True)

    def forward_features(self, x: Tensor) -> Tensor:
        """The unpooled last feature map (``num_features`` channels), as timm's ``forward_features``."""
        self.check_input(x)
        *_, last = self.stages(x)
        return last

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's ``forward_intermediates``: ``(final feature map, [intermediates])``, or the list alone with
        ``intermediates_only=True`` (the network then stops after the deepest one, as with ``stop_early``).

        ``indices``: stage indices into ``stage_info`` (negatives from the end), or an int n for the last n
        stages; None, the selected levels (every stage unless ``out_strides`` / ``out_indices`` chose).
        ``norm`` is accepted for timm's signature: a vertebra stage already ends in what the network
        applies to it (DenseNet's final BN + ReLU); only ``output_fmt="NCHW"``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take = self._selected() if indices is None else take_indices(len(self.stage_info), indices)
        self.check_input(x)
        wanted, last = set(take), max(take)
        out: list[Tensor] = []
        final = None
        for i, feat in enumerate(self.stages(x)):
            if i in wanted:
                out.append(feat)
            final = feat
            if i == last and (intermediates_only or stop_early):
                break
        return out if intermediates_only else (final, out)

    def forward(self, x: Tensor):
        if self.features_only:
            return self.forward_levels(x)
        return self.forward_head(self.forward_features(x))

    # -- the classifier ---------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        """The module that gives the logits (``head.fc`` for most networks; SqueezeNet's ``conv10``)."""
        head = getattr(self, "head", None)
        if head is None:
            raise RuntimeError(f"{self.name} was built with features_only=True: it has no classifier")
        if hasattr(head, "get_classifier"):
            return head.get_classifier()
        if isinstance(head, nn.Linear):
            return head
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise NotImplementedError(f"{type(head).__name__} has no get_classifier() and no nn.Linear")
        return linears[-1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's ``reset_classifier``: a freshly initialised classifier for ``num_classes`` (the auxiliary
        classifiers too); 0 leaves the pooled features (``head_hidden_size`` wide). ``num_classes`` follows."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"{self.name}: only global average pooling ('avg'), got global_pool={global_pool!r}")
        n = int(num_classes)
        if n < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if getattr(self, "head", None) is None:
            raise RuntimeError(f"{self.name} was built with features_only=True: it has no classifier to reset")
        ref = next(iter(self.parameters()), None)  # the device and dtype of the new classifiers
        owners = [(self, "head")]
        aux = getattr(self, "aux_heads", None)
        if aux is not None:
            owners += [(aux, str(i)) for i in range(len(aux))]
        for owner, attr in owners:
            head = getattr(owner, attr)
            if hasattr(head, "reset"):
                head.reset(n)
            else:
                _reset_linear(owner, attr, n)
            if ref is not None:
                new = getattr(owner, attr)
                new = new.get_classifier() if hasattr(new, "get_classifier") else new
                new.to(device=ref.device, dtype=ref.dtype)
        self.num_classes = n

    def prepare_inference(self, dtype: torch.dtype | None = None, channels_last: bool = True, *,
                          fold_bn: bool = True, fuse: bool = True) -> Backbone:
        """In place, for inference (eval mode): BatchNorm folded, conv + act fused, weights channels_last
        and in ``dtype``; the input is converted to match and the output comes back as float32 (see
        ``vertebra.inference``). Irreversible. Returns self."""
        from .inference import prepare_module

        self.eval()
        prepare_module(self, dtype, channels_last, fold_bn=fold_bn, fuse=fuse)
        return self


def init_weights(module: nn.Module) -> None:
    """The usual initialisation of the classic nets: He-normal convs, unit BN, small FC."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
