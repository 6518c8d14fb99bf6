"""Mixed precision in one place: the amp names, their resolution per device, the autocast context."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_DTYPES", "resolve_amp", "autocast"]

#: the mixed-precision names the engine, bench and CLI accept
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str | None, device: str | torch.device) -> str | None:
    """``"auto"``: fp16 on CUDA, bf16 elsewhere; ``None``/``"fp32"``/``"none"``: no autocast; else the name."""
    if amp in (None, "", "fp32", "none", "off"):
        return None
    if amp == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "bf16"
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of auto, fp32, {', '.join(AMP_DTYPES)}; got {amp!r}")
    return amp


def autocast(device: str | torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` ("bf16" / "fp16") on ``device``'s type; a no-op context for None/"fp32"."""
    amp = resolve_amp(amp, device)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])
