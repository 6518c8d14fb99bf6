"""Mixed precision in one place: the amp names, their resolution per device, the autocast context."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_DTYPES", "resolve_amp", "autocast", "cpu_bf16_supported", "cpu_bf16_native", "check_dtype"]

#: the mixed-precision names the engine, bench and CLI accept
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs oneDNN's bfloat16 convolutions (AVX-512 BW/VL/DQ or AVX-NE-CONVERT): without
    them torch's bf16 convolution on CPU fails (``mkldnn_convolution: bf16 path needs the cpu support ...``)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def cpu_bf16_native() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512_BF16 or AMX-BF16, read from /proc/cpuinfo on Linux;
    ``VERTEBRA_CPU_BF16=1``/``0`` says it elsewhere). oneDNN runs bf16 convolutions on any AVX-512 CPU, but without
    these instructions it converts in software and a training step is several times slower than in float32
    (measured 3.7x on a Xeon with AVX-512 and no AVX512_BF16), so ``auto`` picks bf16 only where they are."""
    import os

    forced = os.environ.get("VERTEBRA_CPU_BF16", "").strip().lower()
    if forced:
        return forced not in ("0", "false", "no")
    if not cpu_bf16_supported():
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


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
    """``"auto"``: fp16 on CUDA, bf16 on a CPU that computes in bf16 natively (:func:`cpu_bf16_native`), else none;
    ``None``/``"fp32"``/``"none"``: no autocast; else the name (an explicit bf16 runs wherever oneDNN has bf16
    convolutions)."""
    if amp in (None, "", "fp32", "none", "off"):
        return None
    if amp == "auto":
        kind = torch.device(device).type
        if kind == "cuda":
            return "fp16"
        return "bf16" if kind != "cpu" or cpu_bf16_native() else None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of auto, fp32, {', '.join(AMP_DTYPES)}; got {amp!r}")
    return amp


def autocast(device: str | torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` ("bf16" / "fp16") on ``device``'s type; a no-op context for None/"fp32"."""
    amp = resolve_amp(amp, device)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])
