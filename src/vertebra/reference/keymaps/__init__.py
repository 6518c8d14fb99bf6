"""Key maps from torchvision/timm state_dicts to vertebra's module names.

One module per family, beside this file; each registers converters with
``@keymap(source, *names)``: registry names, or fnmatch patterns over them (``"mobilenet_v2_*"``;
``tests/test_backbones.py`` fails on a name or pattern that matches no registered backbone, and on
a spec reference without a key map). A detector's key map says ``detector=True``: it matches the
detector's name (``retinanet_resnet50_fpn``). A converter takes the twin's state_dict and the
vertebra model and returns a state_dict with vertebra's names (nothing else: the loader
checks it strictly against the model).
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable, Mapping

from torch import Tensor

Converter = Callable[[Mapping[str, Tensor], object], dict[str, Tensor]]
_KEYMAPS: list[tuple[str, str, Converter, bool]] = []
_LOADED = False


def keymap(source: str, *patterns: str, detector: bool = False):
    """Register a converter for ``source`` ("torchvision" | "timm") and registry-name patterns."""

    def deco(fn: Converter) -> Converter:
        for p in patterns:
            _KEYMAPS.append((source, p, fn, detector))
        return fn

    return deco


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        for mod in pkgutil.iter_modules(__path__, __name__ + "."):
            importlib.import_module(mod.name)
        _LOADED = True


def registered_keymaps(detectors: bool = False) -> list[tuple[str, str]]:
    """Every (source, backbone-name pattern) a converter is registered for (detector names instead
    with ``detectors=True``)."""
    _load_all()
    return [(src, pattern) for src, pattern, _, det in _KEYMAPS if det == detectors]


def find_keymap(source: str, name: str) -> Converter | None:
    _load_all()
    for src, pattern, fn, _ in _KEYMAPS:
        if src == source and fnmatch.fnmatchcase(name, pattern):
            return fn
    return None


def rename(sd: Mapping[str, Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, Tensor]:
    """Apply regex rules to every key; the first rule that matches a key renames it."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        new = k
        for pat, rep in compiled:
            if pat.search(k):
                new = pat.sub(rep, k)
                break
        out[new] = v
    return out


def by_order(src: Mapping[str, Tensor], dst_keys: list[str], dst_shapes: Mapping[str, tuple]) -> dict[str, Tensor]:
    """Pair two state_dicts tensor by tensor in registration order, checking every shape.

    For networks whose twin stores the same tensors in the same order under an index-based
    naming (``features.0``, ``features.3``, ...). A different order or count is an error.
    """
    src_items = list(src.items())
    if len(src_items) != len(dst_keys):
        raise ValueError(f"the state_dict has {len(src_items)} tensors, the model {len(dst_keys)}")
    out = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(dst_shapes[dk]):
            raise ValueError(f"{sk} {tuple(sv.shape)} does not pair with {dk} {tuple(dst_shapes[dk])}")
        out[dk] = sv
    return out
