"""Mixed precision in one place: the amp names, their resolution per device, the autocast context."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_DTYPES", "resolve_amp", "autocast", "cpu_bf16_supported", "check_dtype"]

#: the mixed-precision names the engine, bench and CLI accept
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs oneDNN's bfloat16 convolutions (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): without
    them torch's bf16 convolution on CPU fails (``mkldnn_convolution: bf16 path needs the cpu support ...``)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def check_dtype(dtype: torch.dtype | str | None, device: str | torch.device, flag: str = "bf16") -> None:
    """Raise a one-line ``ValueError`` (naming ``flag``) where ``device`` cannot run ``dtype`` ("bf16" / "fp16"
    or the torch dtype): bf16 on a CPU without bf16 convolutions, fp16 anywhere but CUDA."""
    if dtype is None:
        return
    name = dtype if isinstance(dtype, str) else {v: k for k, v in AMP_DTYPES.items()}.get(dtype)
    kind = torch.device(device).type
    if name == "bf16" and kind == "cpu" and not cpu_bf16_supported():
        raise ValueError(f"{flag}: this CPU has no bfloat16 convolutions (oneDNN needs AVX-512 BW/VL/DQ or "
                         f"AVX-NE-CONVERT); run in float32 (leave out {flag})")
    if name == "fp16" and kind != "cuda":
        raise ValueError(f"{flag}: fp16 is for CUDA (float16 needs a CUDA device), this run is on {kind}; on CPU "
                         f"use bf16")


def resolve_amp(amp: str | None, device: str | torch.device) -> str | None:
    """``"auto"``: fp16 on CUDA, bf16 on a CPU with bf16 convolutions, else none; ``None``/``"fp32"``/``"none"``:
    no autocast; else the name."""
    if amp in (None, "", "fp32", "none", "off"):
        return None
    if amp == "auto":
        kind = torch.device(device).type
        if kind == "cuda":
            return "fp16"
        return "bf16" if kind != "cpu" or cpu_bf16_supported() else None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of auto, fp32, {', '.join(AMP_DTYPES)}; got {amp!r}")
    return amp


def autocast(device: str | torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` ("bf16" / "fp16") on ``device``'s type; a no-op context for None/"fp32"."""
    amp = resolve_amp(amp, device)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])
