"""Checkpoints: one safetensors file with every tensor, plus the JSON state.

A checkpoint ``NAME.safetensors`` holds the tensors under prefixes:

* ``model.<key>``: the model's state_dict;
* ``ema.<key>``: the running average of the weights (when the run uses EMA);
* ``optim.<param index>.<name>``: the optimizer state, flattened (momentum buffers, Adam moments, steps);
* ``rng.torch`` / ``rng.cuda.<i>``: the random generators' states.

Its safetensors metadata carries ``{"format": "vertebra-checkpoint", "version": 1, "state": <JSON>}``,
where the JSON state is a :class:`TrainState`: the model description (a
:class:`~vertebra.engine.tasks.ModelSpec`, enough to rebuild the model), the config, the position (step,
epoch, images), the scheduler, the optimizer's non-tensor state (param groups, scalars), EMA bookkeeping,
the Python and NumPy RNG states, the AMP scaler and the best metric. The same JSON is written next to it as
``NAME.json`` for people to read; the checkpoint itself is self-contained. Both are written atomically
(:func:`vertebra._io.atomic_write`), so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_write

__all__ = ["CheckpointError", "Checkpoint", "TrainState", "save_checkpoint", "load_checkpoint", "flatten_optimizer",
           "unflatten_optimizer", "rng_state", "set_rng_state"]

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
        """The model description as saved (a dict; :meth:`ModelSpec.from_dict` reads it)."""
        return self.state["model"]


@dataclass
class TrainState:
    """The JSON state of a training checkpoint (beside its tensors), as :func:`save_checkpoint` writes it."""

    model: dict[str, Any]  # ModelSpec.to_dict()
    config: dict[str, Any]  # TrainConfig.to_dict()
    step: int
    steps_per_epoch: int
    global_batch: int
    world_size: int
    scheduler: dict[str, Any]  # step, warmup, total_steps, base_lrs
    optimizer: dict[str, Any]  # flatten_optimizer's JSON part
    rng: dict[str, Any]
    metric: str
    best_metric: float | None = None
    train_seconds: float = 0.0
    warmup_seconds: float = 0.0
    last_eval: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Any] | None = None  # decay, warmup, num_updates
    scaler: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("ema", "scaler"):
            if d[k] is None:
                del d[k]
        # the position in images, independent of the number of processes that consumed them
        d.update(epoch=self.step // self.steps_per_epoch, samples=self.step * self.global_batch,
                 samples_in_epoch=(self.step % self.steps_per_epoch) * self.global_batch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("global_batch", (d.get("config") or {}).get("global_batch") or 1)
        kw.setdefault("world_size", (d.get("config") or {}).get("world_size") or 1)
        kw.setdefault("steps_per_epoch", 1)
        kw.setdefault("metric", "")
        kw["last_eval"] = kw.get("last_eval") or {}
        return cls(**kw)


def rng_state(device: torch.device) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every random generator's state: (tensors for the checkpoint's ``rng.`` group, JSON for the state)."""
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    v, st, gauss = random.getstate()
    npst = np.random.get_state()
    js = {"python": [v, list(st), gauss],
          "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, js


def set_rng_state(tensors: dict[str, Tensor], js: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v.to(torch.uint8) for _, v in cuda])
    if "python" in js:
        v, st, gauss = js["python"]
        random.setstate((v, tuple(st), gauss))
    if "numpy" in js:
        name, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


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
    from safetensors.torch import save

    p = Path(path)
    flat: dict[str, Tensor] = {}
    for prefix, tensors in groups.items():
        for k, v in tensors.items():
            # safetensors stores plain, contiguous, unshared tensors
            flat[f"{prefix}.{k}"] = v.detach().to("cpu").contiguous().clone()
    text = json.dumps(state, default=_json_default, sort_keys=True)
    meta = {"format": FORMAT, "version": str(VERSION), "state": text}
    atomic_write(p, save(flat, metadata=meta))
    if sidecar:
        atomic_write(p.with_suffix(".json"), json.dumps(state, default=_json_default, indent=1, sort_keys=True) + "\n")
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
