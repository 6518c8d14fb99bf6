"""Which devices this machine has, and one check for a device a user names (``--device``, ``device=``)."""

from __future__ import annotations

import torch

__all__ = ["available_devices", "check_device", "default_device"]


def available_devices() -> list[str]:
    """The devices torch can run on here: ``cpu``, then ``cuda:0`` ... and ``mps`` where present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def default_device() -> str:
    """``cuda`` when a CUDA device is present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | torch.device, flag: str = "--device") -> torch.device:
    """``name`` as a ``torch.device``, or a one-line ``ValueError`` naming ``flag``, the device and what this machine
    has: a malformed name, a device type vertebra does not run on, or a device that is not there (``cuda`` without
    CUDA, ``cuda:3`` on a machine with one GPU)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{flag} {name}: not a device name (use cpu, cuda or cuda:N)") from None
    have = available_devices()
    if dev.type == "cpu":
        return dev
    if dev.type not in ("cuda", "mps"):
        raise ValueError(f"{flag} {name}: vertebra runs on cpu, cuda[:N] or mps (available here: {', '.join(have)})")
    if dev.type == "mps":
        if "mps" not in have:
            raise ValueError(f"{flag} {name}: no Apple GPU (mps) on this machine (available: {', '.join(have)})")
        return dev
    if not torch.cuda.is_available():
        why = "this PyTorch has no CUDA support" if torch.version.cuda is None else \
            "torch sees no CUDA GPU on this machine"
        raise ValueError(f"{flag} {name}: not available, {why} (available: {', '.join(have)})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: not available, this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (available: {', '.join(have)})")
    return dev
