"""Measurements of one network: parameters, multiply-adds, latency, throughput, memory.

Compute is counted in multiply-adds (MACs), the convention of the papers, torchvision and
timm: ``torch.utils.flop_counter`` counts 2 x MACs for convolutions and matmuls, so its
total is halved. Counting runs on the meta device: nothing is allocated or computed.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

__all__ = ["MacCount", "count_macs", "count_params", "time_fn", "Timing"]

# ops that move or reshape data, or whose cost is negligible next to the convolutions:
# not "unsupported", merely free in the MAC convention
_FREE = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "squeeze", "unsqueeze",
    "flatten", "clone", "copy_", "_to_copy", "contiguous", "detach", "alias", "slice", "select", "split",
    "split_with_sizes", "cat", "stack", "empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like",
    "full", "fill_", "zero_", "new_empty", "new_zeros", "constant_pad_nd", "as_strided", "narrow",
    "lift_fresh", "_reshape_alias", "unbind", "chunk", "index", "arange", "scalar_tensor", "_local_scalar_dense",
    "empty_strided", "new_empty_strided", "dropout", "native_dropout", "bernoulli_", "div_", "mul_",
    "channel_shuffle", "pixel_shuffle", "roll", "repeat", "pad", "masked_fill", "where", "gather", "scatter",
    "_native_batch_norm_legit_no_training", "native_batch_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_functional", "relu", "relu_", "hardtanh", "hardtanh_", "sigmoid", "tanh", "silu",
    "silu_", "add", "add_", "sub", "mul", "div", "threshold_backward", "clamp", "clamp_min", "neg",
    "max_pool2d_with_indices", "avg_pool2d", "_adaptive_avg_pool2d", "mean", "sum", "max", "amax",
    "hardswish", "hardswish_", "hardsigmoid", "gelu", "elu", "leaky_relu", "sqrt", "rsqrt", "exp", "log",
    "softmax", "_softmax", "pow", "abs", "norm", "upsample_nearest2d", "upsample_bilinear2d", "max_pool2d",
    "_log_softmax", "addcmul", "lerp", "minimum", "maximum", "sign", "floor", "ceil", "round", "eq", "ne",
    "gt", "lt", "ge", "le", "logical_not", "any", "all", "topk", "sort", "argmax", "cumsum", "_to_dtype",
}


@dataclass
class MacCount:
    gmacs: float
    input_size: tuple[int, ...]
    by_op: dict[str, float] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._overloadpacket)
        return func(*args, **(kwargs or {}))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: tuple[int, int, int], batch: int = 1, device="meta") -> MacCount:
    """Multiply-adds of one forward pass at ``batch x input_size`` (GMACs for the batch).

    ``unsupported`` lists the aten ops that ran without a MAC formula and are not in the
    list of data-movement or elementwise ops counted as free.
    """
    x = torch.empty((batch, *input_size), device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    recorder = _OpRecorder()
    try:
        with torch.no_grad(), counter, recorder:
            model(x)
    finally:
        model.train(was_training)
    by_op: dict[str, float] = {}
    for _mod, ops in counter.get_flop_counts().items():
        if _mod != "Global":
            continue
        for op, n in ops.items():
            by_op[str(op).split(".")[-1]] = by_op.get(str(op).split(".")[-1], 0.0) + n / 2e9
    unsupported = sorted(
        str(op).split(".")[-1]
        for op in recorder.ops
        if op not in flop_registry and str(op).split(".")[-1] not in _FREE
    )
    return MacCount(gmacs=counter.get_total_flops() / 2e9, input_size=tuple(input_size), by_op=by_op,
                    unsupported=unsupported)


def macs_of(name: str, input_size: tuple[int, int, int] | None = None) -> MacCount:
    """GMACs of a registered network at its paper's (or the given) input size, built on meta."""
    from ..registry import backbone_spec, create_backbone

    spec = backbone_spec(name)
    with torch.device("meta"):
        model = create_backbone(name)
    return count_macs(model, input_size or spec.input_size)


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    runs: int

    @property
    def per_second(self) -> float:
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, *, device="cpu", warmup: int = 3, runs: int = 10, min_seconds: float = 0.0) -> Timing:
    """Median and 90th-percentile wall time of ``fn()`` after warm-up, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start) < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
        if len(times) >= 10 * runs:
            break
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return Timing(median_ms=statistics.median(times), p90_ms=p90, runs=len(times))


@contextlib.contextmanager
def fresh_memory(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
