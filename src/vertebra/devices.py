"""Which devices this machine has, one check for a device a user names (``--device``, ``device=``), and the CPU
allocator setting that long CPU work (training, benchmarks, batch prediction) runs faster with."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

__all__ = ["available_devices", "check_device", "default_device", "keep_freed_memory"]

#: glibc's mallopt parameters and the values keep_freed_memory sets: blocks up to 32 MiB (glibc's largest mmap
#: threshold on 64-bit) come from the heap, and up to 1 GiB of freed heap stays with the process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 << 20, 1 << 30
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for the next allocation of the same size instead of returning it to the system.

    PyTorch's CPU tensors come from ``malloc``; glibc serves every block above its mmap threshold (128 KiB at first,
    adapted up to the largest block freed) with a fresh ``mmap`` and unmaps it when freed, so a network's activations,
    the weights autocast casts each step and their gradients are faulted in page by page on every call. With the
    blocks a step uses served from a heap that keeps what is freed, a RetinaNet training step at 256 px runs about
    10 % faster on a 2-core machine (``benchmarks/RESULTS.md``). The cost is that the process holds on to its peak
    memory. Called by the trainer and the ``vertebra`` commands that run a model; a library import changes nothing.
    True where the setting is in place (Linux with glibc), False elsewhere; calling it again changes nothing."""
    global _kept
    if _kept is None:
        _kept = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # musl and other libcs have no mallopt
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                      _TRIM_THRESHOLD))
    return _kept


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
