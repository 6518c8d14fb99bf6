"""Checkpoints: one safetensors file with every tensor, plus the JSON state.

A checkpoint ``NAME.safetensors`` holds the tensors under prefixes:

* ``model.<key>``: the model's state_dict;
* ``ema.<key>``: the running average of the weights (when the run uses EMA);
* ``optim.<param index>.<name>``: the optimizer state, flattened (momentum buffers, Adam moments, steps);
* ``rng.torch`` / ``rng.cuda.<i>``: the random generators' states.

Its safetensors metadata carries ``{"format": "vertebra-checkpoint", "version": 1, "state": <JSON>}``,
where the JSON state is the model description (enough to rebuild the model: task, backbone, number of
classes, categories, detector kwargs), the config, epoch, step, the scheduler position, the optimizer's
non-tensor state (param groups, scalars), EMA bookkeeping, the Python and NumPy RNG states, the AMP
scaler and the best metric. The same JSON is written next to it as ``NAME.json`` for people to read;
the checkpoint itself is self-contained. Both are written to a temporary name and renamed
(``os.replace``), so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint", "flatten_optimizer",
           "unflatten_optimizer", "atomic_write_text"]

FORMAT = "vertebra-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, not ours, or for another model. The message names the file."""


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    groups: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # prefix -> {key: tensor}

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return self.groups.get(prefix, {})

    @property
    def model_spec(self) -> dict[str, Any]:
        return self.state["model"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_default(o: Any):
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state_dict as (tensors ``{"<param index>.<name>": tensor}``, JSON-able rest)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{idx}.{name}"] = v
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(path: str | os.PathLike, groups: dict[str, dict[str, Tensor]], state: dict[str, Any],
                    *, sidecar: bool = True) -> Path:
    """Write ``groups`` (prefix -> tensors) and ``state`` (JSON) as a checkpoint at ``path``, atomically."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    flat: dict[str, Tensor] = {}
    for prefix, tensors in groups.items():
        for k, v in tensors.items():
            # safetensors stores plain, contiguous, unshared tensors
            flat[f"{prefix}.{k}"] = v.detach().to("cpu").contiguous().clone()
    text = json.dumps(state, default=_json_default, sort_keys=True)
    meta = {"format": FORMAT, "version": str(VERSION), "state": text}
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        save_file(flat, str(tmp), metadata=meta)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    if sidecar:
        atomic_write_text(p.with_suffix(".json"), json.dumps(state, default=_json_default, indent=1,
                                                             sort_keys=True) + "\n")
    return p


def load_checkpoint(path: str | os.PathLike, prefixes: tuple[str, ...] | None = None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; ``prefixes`` limits the tensors read.

    Raises :class:`CheckpointError` naming the file when it is missing, not a safetensors file (corrupt,
    truncated) or not a vertebra checkpoint.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint not found")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder; give the checkpoint file (e.g. {p / 'last.safetensors'})")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "state" not in meta:
                raise CheckpointError(f"{p}: not a vertebra checkpoint (no '{FORMAT}' metadata); train one with "
                                      "`vertebra train` (plain weights load with vertebra.load_reference_weights)")
            groups: dict[str, dict[str, Tensor]] = {}
            for key in f.keys():
                prefix, _, rest = key.partition(".")
                if prefixes is not None and prefix not in prefixes:
                    continue
                groups.setdefault(prefix, {})[rest] = f.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError on damage
        raise CheckpointError(f"{p}: cannot read checkpoint (corrupt or truncated file?): {e}") from None
    try:
        state = json.loads(meta["state"])
    except ValueError as e:
        raise CheckpointError(f"{p}: checkpoint state is not valid JSON: {e}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{p}: checkpoint state has no model description ('model')")
    return Checkpoint(p, state, groups)
