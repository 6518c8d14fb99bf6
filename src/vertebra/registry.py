"""The registry of backbones: ``@register`` and the look-ups.

Every network module in ``vertebra.backbones`` registers each of its variants with
``@register(name, family=..., paper=..., ...)`` on a builder function. Each fact has one home:

- the module (``@register``) states what the network *is*: family, paper, year, arXiv id,
  whether it has residual branches stochastic depth can drop (``supports_drop_path``), and the
  torchvision/timm twins beyond the table's (``references``); the network class states its
  smallest input (``Backbone.min_input_size``, which may depend on the constructor arguments);
- ``reference/architectures.tsv`` holds the figures: parameter count and tolerance, GMACs,
  errors, dataset, input size, the primary twin and where each figure comes from. Its
  family/paper/year/arxiv columns are the fact sheet's own copy: the registry does not read
  them, and ``tests/test_backbones.py`` fails if a filled cell disagrees with ``@register``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .reference import facts_for

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATION", "BackboneSpec", "register", "list_backbones",
           "list_families", "list_models", "backbone_spec", "create_backbone", "create_model", "closest_names",
           "check_kwargs", "builder_arguments"]


#: the per-channel statistics of each training set, for input normalisation (RGB, 0..1 pixels)
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
}
IMAGENET_MEAN, IMAGENET_STD = NORMALIZATION["imagenet"]


@dataclass(frozen=True)
class BackboneSpec:
    """What the paper says about one registered network; building it needs no weights."""

    name: str
    family: str
    paper: str
    year: int | None
    arxiv: str | None
    dataset: str  # "imagenet" | "cifar10" | "cifar100" | "mnist"
    input_size: tuple[int, int, int]
    num_classes: int
    paper_params_m: float | None
    paper_gmacs: float | None
    paper_top1_err: float | None
    reference: str | None  # "torchvision:resnet50", "timm:inception_v3" or None: references[0]
    # beyond the contract: what the tests and the CLI need
    params_tol_pct: float = 2.0
    paper_top5_err: float | None = None
    paper_cifar_err: str | None = None
    source: str = ""
    #: every torchvision/timm network that is this network (same outputs for the same weights), the
    #: facts table's twin first; each has a key map in ``vertebra.reference.keymaps``
    references: tuple[str, ...] = ()
    #: whether ``drop_path_rate`` (stochastic depth) has residual branches to drop
    supports_drop_path: bool = True
    defaults: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def mean(self) -> tuple[float, ...]:
        """The per-channel mean the network's inputs are normalised with (its training set's)."""
        return NORMALIZATION[self.dataset][0]

    @property
    def std(self) -> tuple[float, ...]:
        """The per-channel standard deviation the network's inputs are normalised with."""
        return NORMALIZATION[self.dataset][1]

    @property
    def weights(self) -> list:
        """The published weights of this network (:class:`vertebra.hub.Weights`, the default first); [] if none."""
        from .hub import list_weights

        return list_weights(self.name)

    @property
    def has_weights(self) -> bool:
        from .hub import has_weights

        return has_weights(self.name)

    @property
    def reference_source(self) -> str | None:
        return self.reference.split(":", 1)[0] if self.reference else None

    @property
    def reference_name(self) -> str | None:
        return self.reference.split(":", 1)[1] if self.reference else None


_REGISTRY: dict[str, tuple[BackboneSpec, Callable]] = {}
_LOADED = False

_DATASET_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "mnist": 10}


def _float(s: str) -> float | None:
    s = (s or "").strip()
    return float(s) if s else None


def register(
    name: str,
    *,
    family: str,
    paper: str,
    year: int | None = None,
    arxiv: str | None = None,
    dataset: str | None = None,
    input_size: tuple[int, int, int] | None = None,
    references: tuple[str, ...] = (),
    supports_drop_path: bool = True,
    **defaults,
):
    """Register a builder under ``name``; the facts table fills in the paper's figures.

    ``references`` are twins beyond the facts table's (it lists one per network), as
    "torchvision:NAME" / "timm:NAME". ``supports_drop_path=False`` for networks without residual
    branches: ``create_backbone`` then refuses a non-zero ``drop_path_rate`` and does not pass
    one to the builder. ``defaults`` are architecture keyword arguments that make this variant
    what it is (depth, width, ...); they are passed to the builder and may be overridden by a caller.
    """

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        row = facts_for(name)
        ds = dataset or row.get("dataset") or "imagenet"
        if input_size is not None:
            size = tuple(input_size)
        elif row.get("input_size"):
            size = tuple(int(v) for v in row["input_size"].split("x"))
        else:
            size = (3, 224, 224)
        twin = (row.get("twin") or "").split("@", 1)[0].strip()
        refs = ((twin,) if twin else ()) + tuple(references)
        bad = [r for r in refs if r.split(":", 1)[0] not in ("torchvision", "timm") or ":" not in r]
        if bad or len(set(refs)) != len(refs):
            raise ValueError(f"backbone {name!r}: references {refs} must be distinct 'torchvision:NAME' / 'timm:NAME'")
        spec = BackboneSpec(
            name=name,
            family=family,
            paper=paper,
            year=year,
            arxiv=arxiv,
            dataset=ds,
            input_size=size,
            num_classes=_DATASET_CLASSES[ds],
            paper_params_m=_float(row.get("params_m", "")),
            paper_gmacs=_float(row.get("paper_gmacs", "")),
            paper_top1_err=_float(row.get("paper_top1_err", "")),
            reference=refs[0] if refs else None,
            params_tol_pct=_float(row.get("tol_pct", "")) or 2.0,
            paper_top5_err=_float(row.get("paper_top5_err", "")),
            paper_cifar_err=(row.get("paper_cifar_err") or None),
            source=row.get("source", ""),
            references=refs,
            supports_drop_path=supports_drop_path,
            defaults=dict(defaults),
        )
        _REGISTRY[name] = (spec, fn)
        return fn

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    from . import backbones

    for mod in pkgutil.walk_packages(backbones.__path__, backbones.__name__ + "."):
        importlib.import_module(mod.name)
    _LOADED = True


def _lookup(name: str) -> tuple[BackboneSpec, Callable]:
    _load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise KeyError(f"unknown backbone {name!r}{hint} (vertebra.list_backbones() lists all {len(_REGISTRY)})")
    return _REGISTRY[name]


def _natural_key(name: str) -> list:
    """timm's natural order: "resnet18" < "resnet34" < "resnet101" (digit runs compare as numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def closest_names(name: str, valid, n: int = 4) -> list[str]:
    """The valid names closest to ``name`` (difflib), best first."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.6)
    if len(close) < n:  # a prefix or a part of the name (out_ind, fpn) also counts
        close += [v for v in valid if v not in close and (v.startswith(name[:4]) or name in v)][: n - len(close)]
    return close or difflib.get_close_matches(name, valid, n=n, cutoff=0.0)


class UnknownArgumentError(TypeError, ValueError):
    """A keyword a builder does not take; the message names the closest valid ones. A TypeError as Python's own, and
    a ValueError so that the command line reports it in one line (``--backbone-kw`` / ``--detector-kw``)."""


def check_kwargs(where: str, given, valid) -> None:
    """Raise UnknownArgumentError naming the first of ``given`` not in ``valid`` and the closest valid names."""
    valid = set(valid)
    unknown = [k for k in given if k not in valid]
    if unknown:
        k = unknown[0]
        more = f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
        raise UnknownArgumentError(f"{where}: unknown argument {k!r}{more}; closest: "
                                   f"{', '.join(closest_names(k, valid))}")


def list_backbones(family: str | None = None) -> list[str]:
    """Sorted registry names, optionally of one family (case-insensitive)."""
    _load_all()
    if family is None:
        return sorted(_REGISTRY)
    fam = family.lower()
    names = sorted(n for n, (s, _) in _REGISTRY.items() if s.family.lower() == fam)
    if not names:
        raise KeyError(f"unknown family {family!r}; families: {', '.join(list_families())}")
    return names


def list_models(pattern: str | Sequence[str] = "*", pretrained: bool = False,
                exclude: str | Sequence[str] | None = None) -> list[str]:
    """timm's ``list_models``: the registry names that match the wildcard ``pattern`` (fnmatch: ``"resnet*"``,
    ``"*net*"``; a list of patterns also works), minus those matching ``exclude``, only those with published
    weights if ``pretrained``; in timm's natural order (resnet18, resnet34, ..., resnet101)."""
    import fnmatch

    from .hub import has_weights

    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    excludes = [] if not exclude else [exclude] if isinstance(exclude, str) else list(exclude)
    names = [n for n in list_backbones() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, e) for e in excludes)]
    if pretrained:
        names = [n for n in names if has_weights(n)]
    return sorted(names, key=_natural_key)


def list_families() -> list[str]:
    """Sorted family names (what ``list_backbones(family)`` accepts)."""
    _load_all()
    return sorted({s.family for s, _ in _REGISTRY.values()})


def backbone_spec(name: str) -> BackboneSpec:
    return _lookup(name)[0]


_OWN_ARGS = ("num_classes", "in_chans", "features_only", "out_strides", "out_indices", "drop_path_rate", "pretrained",
             "weights", "checkpoint_path")


def _params(fn) -> tuple[set[str], bool]:
    """The keyword names ``fn`` takes and whether it also takes ``**kwargs``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def builder_arguments(name: str) -> set[str] | None:
    """The architecture keywords the builder of ``name`` takes (its own and those of the class it returns, when
    it passes ``**kwargs`` on to it); None if they cannot be known."""
    _, builder = _lookup(name)
    names, var = _params(builder)
    if var:
        ret = inspect.signature(builder).return_annotation
        cls = builder.__globals__.get(ret) if isinstance(ret, str) else ret
        if not isinstance(cls, type):
            return None
        for klass in cls.__mro__:  # a constructor that passes **kwargs on to its base's
            if "__init__" not in vars(klass):
                continue
            more, var = _params(klass.__init__)
            names |= more
            if not var:
                break
        if var:
            return None
    return names - {"num_classes", "in_chans"}


def create_backbone(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    features_only: bool = False,
    out_strides=None,
    drop_path_rate: float | None = None,
    pretrained=False,
    weights=None,
    out_indices=None,
    checkpoint_path=None,
    **arch_kwargs,
):
    """Build a registered network (``vertebra.create_model`` is the same function, timm's spelling).

    ``num_classes`` defaults to the paper's dataset (1000 for ImageNet, 10 for CIFAR-10 and
    MNIST), or to the class count of the ``pretrained`` weights; ``in_chans`` to the paper's input
    channels. ``drop_path_rate`` (stochastic depth, the paper's linear rule) defaults to 0, except
    for the stochastic-depth presets (``resnet110_sd``, ``resnet152_sd``: 0.5, i.e. p_L = 0.5).

    ``pretrained``: True, the network's best published weights (``vertebra weights list NAME``);
    a tag such as ``"torchvision:IMAGENET1K_V2"`` or ``"timm:a1_in1k"``, that set. They are
    downloaded once into the cache and loaded through the twin's key map, with the build
    arguments they need (``Weights.build_kwargs``); a ``num_classes`` other than theirs keeps a
    new classifier (a log line says so); ``features_only`` loads the body. ``model.pretrained_weights``
    is the entry (its ``mean`` / ``std`` / ``input_size`` are the preprocessing they expect).
    ``weights`` is a path or an http(s) URL of a checkpoint instead: vertebra's own, or a
    torchvision/timm state_dict of the network's twin.

    timm's names work too: ``out_indices`` (stage indices into ``stage_info``, negatives from the end; instead of
    ``out_strides``) and ``checkpoint_path`` (= ``weights``). Any other keyword must be one of the network's
    architecture arguments (``depth``, ``drop_rate``, ...): an unknown one raises TypeError naming the closest.
    """
    spec, builder = _lookup(name)
    if checkpoint_path is not None:
        if weights is not None:
            raise ValueError("give weights or checkpoint_path (timm's name for it), not both")
        weights = checkpoint_path
    if out_indices is not None and out_strides is not None:
        raise ValueError("give out_strides or out_indices (timm's stage indices), not both")
    arch = builder_arguments(name)
    if arch is not None:
        check_kwargs(f"create_backbone({name!r})", arch_kwargs, arch | set(_OWN_ARGS))
    w = None
    if pretrained is not None and pretrained is not False:
        if weights is not None:
            raise ValueError("give pretrained (published weights by name) or weights (a file or URL), not both")
        from .hub import resolve

        w = resolve(name, pretrained)
        if in_chans not in (None, w.input_size[0]):
            raise ValueError(f"{name} weights {w.tag} take {w.input_size[0]} input channels, not in_chans={in_chans}")
    kwargs = dict(spec.defaults)
    if w is not None:
        clash = {k: v for k, v in w.build_kwargs.items() if k in arch_kwargs and arch_kwargs[k] != v}
        if clash:
            raise ValueError(f"{name} weights {w.tag} are for {w.build_kwargs}; {clash} does not fit them")
        kwargs.update(w.build_kwargs)
    kwargs.update(arch_kwargs)
    preset_rate = kwargs.pop("drop_path_rate", 0.0)
    rate = preset_rate if drop_path_rate is None else drop_path_rate
    if spec.supports_drop_path:
        kwargs["drop_path_rate"] = rate
    elif rate:
        raise ValueError(f"{name} has no residual branches to drop: drop_path_rate must be 0, got {rate}")
    default_classes = spec.num_classes if w is None else w.num_classes
    n = default_classes if num_classes is None else num_classes
    c = spec.input_size[0] if in_chans is None else in_chans
    try:
        model = builder(num_classes=n, in_chans=c, **kwargs)
    except TypeError as e:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if bad is None or bad[1] not in arch_kwargs:
            raise
        known = set(_OWN_ARGS) | set(spec.defaults) | (arch or set())
        raise UnknownArgumentError(f"create_backbone({name!r}): unknown argument {bad[1]!r}; closest: "
                        f"{', '.join(closest_names(bad[1], known - {bad[1]}))}") from None
    model.spec = spec
    model.configure_outputs(features_only=features_only, out_strides=out_strides, out_indices=out_indices)
    if w is not None:
        from .hub import load_pretrained

        template = None
        if not features_only and n != w.num_classes:
            import torch

            with torch.device("meta"):
                template = builder(num_classes=w.num_classes, in_chans=c, **kwargs)
        load_pretrained(model, w, template=template)
    elif weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model


#: timm's name for :func:`create_backbone`
create_model = create_backbone
