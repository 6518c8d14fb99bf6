"""Loading weights: vertebra's own checkpoints and the state_dicts of torchvision/timm twins.

Nothing loads partially: a state_dict whose keys or shapes do not match the model fails
with the list of what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .reference.keymaps import find_keymap

__all__ = ["load_reference_weights", "load_weights", "read_state_dict", "StateDictMismatch"]

_SOURCES = ("torchvision", "timm")


class StateDictMismatch(ValueError):
    """A state_dict that does not fit the model; the message lists every difference."""


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state_dict from a .safetensors file or a torch checkpoint (.pt/.pth/.bin)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # corrupt or truncated file
            raise ValueError(f"{p}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a Python object: unpickling it could run code
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(f"{p}: not a readable torch checkpoint: it holds pickled Python objects{what}, not only "
                         f"tensors, and vertebra never unpickles them (loading it could run code)") from exc
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{p}: not a readable torch checkpoint ({first})") from exc
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{p}: holds no state_dict (a mapping of names to tensors)")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def complete_batchnorm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` with a ``num_batches_tracked`` (0) beside every BatchNorm's ``running_var`` that lacks one:
    files saved before PyTorch 0.4.1 (torchvision's first ImageNet weights among them) have none, and
    torch's BatchNorm fills them in on load the same way."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():  # in the file's order, each filled-in key after its running_var (as torch registers)
        out[k] = v
        nbt = k[: -len("running_var")] + "num_batches_tracked"
        if k.endswith(".running_var") and nbt not in sd:
            out[nbt] = torch.tensor(0, dtype=torch.long)
    return out


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    attrs = getattr(model, "head_attrs", ())
    return tuple(f"{a}." for a in attrs)


def _fit(model: nn.Module, sd: Mapping[str, Tensor], what: str, drop_head: bool = False) -> dict[str, Tensor]:
    """Check ``sd`` against the model, key by key and shape by shape; raise on any difference.

    A features_only model has no head: head keys in ``sd`` are dropped, not reported. ``drop_head``: the
    model's classifier is not loaded either (published weights for another class count); the result then
    lacks the model's head keys, which keep their values.
    """
    own = model.state_dict()
    sd = dict(sd)
    heads = _head_prefixes(model)
    if getattr(model, "features_only", False) or drop_head:
        sd = {k: v for k, v in sd.items() if not k.startswith(heads)}
    if drop_head:
        own = {k: v for k, v in own.items() if not k.startswith(heads)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"{what} does not fit {getattr(model, 'name', type(model).__name__)}:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:25]) + (f", ... ({len(items) - 25} more)" if len(items) > 25 else "")
                lines.append(f"  {len(items)} {label}: {shown}")
        raise StateDictMismatch("\n".join(lines))
    return sd


def load_reference_weights(model: nn.Module, state_dict_or_path, source: str = "torchvision", *,
                           template: nn.Module | None = None) -> nn.Module:
    """Load a torchvision or timm state_dict of the model's twin into a vertebra network.

    The key map for (source, network) lives in ``vertebra.reference.keymaps``; the load is
    strict, so a state_dict of another network fails with the keys that differ.
    ``template``: the same network with the state_dict's class count (on the meta device is
    enough) for a model whose classifier differs: the keys are mapped against it and everything
    but the classifier is loaded (strictly); the model's classifier keeps its values.
    """
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    what = f"{source} state_dict"
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        what = f"{source} checkpoint {state_dict_or_path}"
        sd = read_state_dict(state_dict_or_path)
    elif isinstance(state_dict_or_path, Mapping):
        sd = dict(state_dict_or_path)
    else:
        raise TypeError("state_dict_or_path must be a mapping of tensors or a path")
    name = getattr(model, "name", None) or type(model).__name__
    convert = find_keymap(source, name)
    if convert is None:
        raise ValueError(f"no {source} key map for {name!r}: vertebra knows no {source} twin of it")
    mapped = convert(complete_batchnorm(sd), model if template is None else template)
    mapped = _fit(model, mapped, what, drop_head=template is not None)
    model.load_state_dict(mapped, strict=template is None)
    return model


def load_weights(model: nn.Module, path) -> nn.Module:
    """``create_backbone(weights=...)``: vertebra's own checkpoint, or the twin's state_dict; a path, or an
    http(s) URL (downloaded once into the weights cache, ``vertebra.hub.url_path``)."""
    from . import hub

    if hub.is_url(path):
        path = hub.fetch(path, hub.url_path(path))
    sd = read_state_dict(path)
    try:
        fitted = _fit(model, sd, f"checkpoint {path}")
    except StateDictMismatch as own_error:
        spec = getattr(model, "spec", None)
        if spec is None or not spec.reference:
            raise
        from .reference.twins import in_twin_order

        if Path(str(path)).suffix == ".safetensors":  # keys stored sorted: put them in the twin's order
            sd = in_twin_order(sd, spec.reference, getattr(model, "num_classes", 1000) or 1000)
        try:
            return load_reference_weights(model, sd, spec.reference_source)
        except StateDictMismatch as twin_error:
            raise StateDictMismatch(f"{own_error}\nread as a {spec.reference} state_dict:\n{twin_error}") from None
    model.load_state_dict(fitted, strict=True)
    return model
