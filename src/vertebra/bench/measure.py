"""Measurements of one network: parameters, multiply-adds, latency, throughput, memory.

Compute is counted in multiply-adds (MACs), the convention of the papers, torchvision and
timm: ``torch.utils.flop_counter`` counts 2 x MACs for convolutions and matmuls, so its
total is halved. Counting runs on the meta device: nothing is allocated or computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .. import precision
from ..backbone import count_params

__all__ = ["MacCount", "count_macs", "time_fn", "Timing", "BenchConfig", "bench_device", "check_config",
           "current_rss_mb", "peak_rss_mb", "measure_model", "measure_detector", "compile_detector_network"]

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


def time_fn(fn, *, device="cpu", warmup: int = 3, runs: int = 10, min_seconds: float = 0.0,
            settle: int = 0) -> Timing:
    """Median and 90th-percentile wall time of ``fn()`` after warm-up, synchronised on CUDA.

    ``settle``: after the warm-up, up to that many more untimed calls, until one takes no more than 1.25 x the one
    before (a compiled model runs slow for a few calls after compiling, longer on a busy machine)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    last = float("inf")
    for _ in range(settle):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        took = time.perf_counter() - t0
        if took <= 1.25 * last:
            break
        last = took
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


def current_rss_mb() -> float | None:
    """This process's resident memory now, in MiB: ``/proc/self/statm`` on Linux; None where there is no such
    probe (macOS, Windows): the caller then takes the peak before measuring as the baseline."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (macOS), no os.sysconf (Windows)
        return None


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MiB, from ``getrusage``'s ``ru_maxrss``: kibibytes on Linux
    (and the BSDs), bytes on macOS. None where the ``resource`` module does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, AttributeError, ValueError):
        return None
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# -- one network, end to end ---------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_device(device: str | None = None) -> str:
    """The device to measure on: ``device``, or when None the one ``train`` / ``eval`` / ``predict`` default to
    (:func:`vertebra.devices.default_device`: ``cuda`` when present, else ``cpu``)."""
    from ..devices import default_device

    return default_device() if device is None else str(device)


@dataclass
class BenchConfig:
    """What to measure and how. ``input`` None: each network's paper input size. ``device`` None (the default):
    ``cuda`` when present, else ``cpu`` (:func:`bench_device`)."""

    input: int | None = None
    batch: int = 8
    device: str | None = None
    dtype: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    task: str = "cls"  # "cls" | "det"
    det_size: int = 512
    eager: bool = False  # vertebra without its inference path (no BN folding / fusion)
    train: bool = True
    backends: tuple[str, ...] = ()  # also time vertebra's rows on these ("compile", "onnxruntime"): a column each
    warmup: int = 1
    runs: int = 3
    min_seconds: float = 1.0

    def __post_init__(self) -> None:
        self.device = bench_device(self.device)


def _cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU back-end (inductor) would call: ``$CXX``, else c++ / g++ / clang++."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_compile(device) -> None:
    """Raise ValueError, naming the reason, when ``torch.compile`` cannot compile on ``device`` here: its CPU
    back-end (inductor) builds C++ and needs a compiler on the PATH (or ``$CXX``); on Windows it needs
    Visual Studio's, which this check does not look for."""
    dev = torch.device(device)
    if dev.type == "cpu" and not sys.platform.startswith("win") and _cpp_compiler() is None:
        raise ValueError("--compile on cpu: torch.compile (inductor) builds C++ and no compiler was found "
                         "(set CXX or install g++ / clang++); or leave out --compile")


def check_config(cfg: BenchConfig) -> None:
    """Fail early, and clearly, on a device or dtype this machine cannot run."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    from ..devices import check_device

    dev = check_device(cfg.device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {cfg.device!r} is not supported: use cpu or cuda[:N]")
    precision.check_dtype(None if cfg.dtype == "fp32" else cfg.dtype, dev, flag=f"--dtype {cfg.dtype}")
    if cfg.task not in ("cls", "det"):
        raise ValueError(f"--task must be cls or det, got {cfg.task!r}")
    if cfg.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {cfg.batch}")
    if cfg.compile:
        check_compile(dev)
    from ..export.runtime import BACKENDS, require_onnxruntime

    for b in cfg.backends:
        if b not in BACKENDS or b == "torch":
            raise ValueError(f"--backend: choose among {', '.join(BACKENDS)}, got {b!r}")
        if b == "compile":
            check_compile(dev)
        if b == "onnxruntime":
            if dev.type != "cpu" or cfg.dtype != "fp32":
                raise ValueError("--backend onnxruntime times the float32 graph on CPU: use --device cpu --dtype fp32")
            try:
                require_onnxruntime()
            except ImportError as e:
                raise ValueError(f"--backend onnxruntime: {e}") from None


def machine_info(device: str = "cpu") -> dict:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = ""
    return info


def peak_gmacs_per_s(device: str = "cpu", dtype: str = "fp32", n: int | None = None) -> float:
    """The machine's ceiling: GMAC/s of a large square-ish matmul on this device and dtype.

    On CPU the same GEMM runs through both of torch's back-ends, BLAS (``torch.mm``) and oneDNN
    (a 1x1 convolution over a channels_last batch is exactly a matmul), and the faster counts:
    on some CPUs (AMD EPYC here) BLAS stops at AVX2 while oneDNN uses AVX-512 and runs twice as
    fast, and the networks' convolutions go through oneDNN. Best of five runs after warm-up.
    """
    dev = torch.device(device)
    dt = DTYPES[dtype]
    n = n or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)

    def best_ms(fn) -> float:
        for _ in range(2):
            fn()
        _sync(device)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1000.0)
        return min(times)

    with torch.inference_mode():
        peak = n**3 / (best_ms(lambda: a @ b) / 1000.0) / 1e9
        if dev.type == "cpu":
            k = 1024
            x = torch.randn(16, k, 32, 32, dtype=dt).contiguous(memory_format=torch.channels_last)
            w = torch.randn(k, k, 1, 1, dtype=dt).contiguous(memory_format=torch.channels_last)
            macs = 16 * 32 * 32 * k * k
            peak = max(peak, macs / (best_ms(lambda: torch.nn.functional.conv2d(x, w)) / 1000.0) / 1e9)
    return peak


def _autocast(cfg: BenchConfig):
    """The measurement's precision: ``--dtype bf16 / fp16`` run under autocast (vertebra.precision)."""
    return precision.autocast(cfg.device, None if cfg.dtype == "fp32" else cfg.dtype)


def _prepare(model: nn.Module, cfg: BenchConfig, optimize: bool) -> nn.Module:
    from ..inference import optimize_for_inference

    model = model.to(cfg.device).eval()
    if optimize:
        fuse = torch.device(cfg.device).type == "cpu" and cfg.dtype == "fp32"
        return optimize_for_inference(model, channels_last=cfg.channels_last, fuse=fuse, compile=cfg.compile,
                                      inplace=True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.compile else model


def _warmup(cfg: BenchConfig) -> dict:
    """``time_fn``'s warm-up: with ``compile`` at least one call (compiling is never timed) and then the calls
    until the compiled model runs at its speed."""
    return {"warmup": max(1, cfg.warmup), "settle": 20} if cfg.compile else {"warmup": cfg.warmup}


class _Counted(nn.Module):
    """``inner`` (a compiled module), counting its calls: the proof that the timed calls ran the compiled code."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def compile_detector_network(model: nn.Module) -> Callable[[], int]:
    """In place: ``torch.compile`` a RetinaNet's network, the two calls ``model(images)`` makes into it: the
    backbone + FPN (``model.net.pyramid``) and the heads (``model.net.head``). Preprocessing, anchors and the
    postprocessing (top-k and NMS: data-dependent shapes, and the ``postprocess_ms`` hooks) stay eager, as the
    backbone alone is what ``--compile`` compiles for ``--task cls``. Static shapes: each batch size gets its
    own graph, compiled during its warm-up. Returns a function giving how many times the compiled network ran."""
    net = model.net
    pyramid = torch.compile(net.pyramid, dynamic=False)
    head = _Counted(torch.compile(net.head, dynamic=False))
    pyramid_calls = [0]

    def compiled_pyramid(x):
        pyramid_calls[0] += 1
        return pyramid(x)

    net.pyramid = compiled_pyramid
    net.head = head
    return lambda: min(pyramid_calls[0], head.calls)


def _input(batch: int, size: tuple[int, int, int], cfg: BenchConfig) -> torch.Tensor:
    x = torch.randn(batch, *size, device=cfg.device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def measure_model(build, size: tuple[int, int, int], cfg: BenchConfig, optimize: bool) -> dict:
    """Latency (batch 1), throughput (batch N), one training step and peak memory of the model
    ``build()`` returns (a fresh model each call, on CPU, in train mode)."""
    row: dict = {}
    model = build()
    row["params_m"] = count_params(model) / 1e6
    with torch.device("meta"):
        meta_model = build()
    macs = count_macs(meta_model, size)
    row["gmacs"] = macs.gmacs
    row["unsupported_ops"] = " ".join(macs.unsupported)
    del meta_model

    dev = torch.device(cfg.device)
    with fresh_memory(cfg.device):
        if cfg.train:
            tmodel = model.to(cfg.device).train()
            if cfg.channels_last:
                tmodel = tmodel.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(tmodel.parameters(), lr=1e-3, momentum=0.9)
            xb = _input(cfg.batch, size, cfg)

            def step():
                opt.zero_grad(set_to_none=True)
                with _autocast(cfg):
                    out = tmodel(xb)
                    out = out[0] if isinstance(out, tuple) else out
                    loss = out.float().logsumexp(1).mean()
                loss.backward()
                opt.step()

            t = time_fn(step, device=cfg.device, warmup=cfg.warmup, runs=max(2, cfg.runs - 1))
            row["train_ips"] = cfg.batch / (t.median_ms / 1000)
            del opt, xb
        imodel = _prepare(model, cfg, optimize)  # with cfg.compile: torch.compile of the whole backbone
        x1 = _input(1, size, cfg)
        xb = _input(cfg.batch, size, cfg)
        warmup = _warmup(cfg)
        with torch.inference_mode(), _autocast(cfg):
            lat = time_fn(lambda: imodel(x1), device=cfg.device, runs=cfg.runs, **warmup,
                          min_seconds=cfg.min_seconds)
            thr = time_fn(lambda: imodel(xb), device=cfg.device, runs=cfg.runs, **warmup,
                          min_seconds=cfg.min_seconds)
        row["compile"] = bool(cfg.compile)
        row["latency_ms"] = lat.median_ms
        row["latency_p90_ms"] = lat.p90_ms
        row["throughput_ips"] = cfg.batch / (thr.median_ms / 1000)
        if dev.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    row["achieved_gmacs_per_s"] = row["gmacs"] * row["throughput_ips"]
    if optimize:
        row.update(backend_timings(build, x1, xb, cfg))
    return row


def backend_timings(build, x1, xb, cfg: BenchConfig, size: int | None = None) -> dict:
    """``latency_ms_<backend>`` (batch 1) and ``throughput_ips_<backend>`` (batch N) of a fresh ``build()`` made
    for each of ``cfg.backends`` by ``optimize_for_inference(backend=...)`` (onnxruntime: as many intra-op threads
    as torch has). ``xb``: the batch (a list of images for a detector, whose canvas is ``size``)."""
    from ..inference import optimize_for_inference

    out: dict = {}
    for b in cfg.backends:
        model = build().to(cfg.device).eval()
        kw = {"threads": torch.get_num_threads(), "size": size} if b == "onnxruntime" else {}
        if b == "onnxruntime" and isinstance(x1, torch.Tensor) and size is None:
            kw["example"] = x1
        made = optimize_for_inference(model, backend=b, channels_last=cfg.channels_last, inplace=True, **kw)
        warm = {"warmup": max(1, cfg.warmup), "settle": 20} if b == "compile" else {"warmup": cfg.warmup}
        lat, thr = _time_pair(made, x1, xb, cfg, warm)
        n = len(xb) if isinstance(xb, (list, tuple)) else int(xb.shape[0])
        out[f"latency_ms_{b}"] = lat.median_ms
        out[f"throughput_ips_{b}"] = n / (thr.median_ms / 1000)
    return out


def _time_pair(model, x1, xb, cfg: BenchConfig, warm: dict):
    with torch.inference_mode():
        lat = time_fn(lambda: model(x1), device=cfg.device, runs=cfg.runs, min_seconds=cfg.min_seconds, **warm)
        thr = time_fn(lambda: model(xb), device=cfg.device, runs=cfg.runs, min_seconds=cfg.min_seconds, **warm)
    return lat, thr


def measure_detector(name: str, cfg: BenchConfig, num_classes: int = 80) -> dict:
    """The backbone inside RetinaNet at ``cfg.det_size``, timed as ``predict`` runs it:
    ``optimize_for_inference`` (unless ``cfg.eager``; ``cfg.compile`` compiles its network:
    :func:`compile_detector_network`) and ``model(images)``
    end to end (preprocessing, network, postprocessing). ``postprocess_ms`` is the share of the
    postprocessing (decoding, top-k, NMS) per image, timed inside the same calls.

    The score threshold is 0, so every image sends its top-k candidates per level through NMS:
    the postprocessing figure is the worst case, not that of a confident trained model."""
    from ..detection import create_detector

    size = cfg.det_size

    def build():
        return create_detector("retinanet", backbone=name, num_classes=num_classes, min_size=size, max_size=size,
                               score_thresh=0.0)

    model = build().to(cfg.device).eval()
    row = {"params_m": count_params(model) / 1e6}
    with torch.device("meta"):
        meta = build().eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta.net(torch.empty(1, 3, size, size))
    row["gmacs"] = counter.get_total_flops() / 2e9
    post_times: list[float] = []
    started: list[float] = []
    model.postprocess.register_forward_pre_hook(lambda m, a: started.append(time.perf_counter()))
    model.postprocess.register_forward_hook(lambda m, a, o: post_times.append(time.perf_counter() - started[-1]))
    # the network is compiled below, not the whole detector (whose postprocessing would graph-break)
    model = _prepare(model, dataclasses.replace(cfg, compile=False), optimize=not cfg.eager)
    compiled_calls = compile_detector_network(model) if cfg.compile else None
    images = torch.rand(cfg.batch, 3, size, size, device=cfg.device)
    warmup = _warmup(cfg)
    with fresh_memory(cfg.device), torch.inference_mode(), _autocast(cfg):
        x1 = images[:1]
        lat = time_fn(lambda: model(x1), device=cfg.device, runs=cfg.runs, **warmup,
                      min_seconds=cfg.min_seconds)
        post_times.clear()
        thr = time_fn(lambda: model(images), device=cfg.device, runs=cfg.runs, **warmup,
                      min_seconds=cfg.min_seconds)
    if compiled_calls is not None and compiled_calls() == 0:  # never label a row compiled that ran eager
        raise RuntimeError("--compile: the compiled network never ran in the timed calls (RetinaNet.forward no "
                           "longer calls net.pyramid / net.head?); nothing compiled was measured")
    row["compile"] = compiled_calls is not None
    post_ms = 1000 * statistics.median(post_times) if post_times else float("nan")
    row.update(latency_ms=lat.median_ms, latency_p90_ms=lat.p90_ms, throughput_ips=cfg.batch / (thr.median_ms / 1000),
               postprocess_ms=post_ms / cfg.batch)
    if torch.device(cfg.device).type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated(torch.device(cfg.device)) / 2**20
    row["achieved_gmacs_per_s"] = row["gmacs"] * row["throughput_ips"]
    if not cfg.eager and cfg.backends:
        # the detector's backends take images in 0..1, as predict gives them
        row.update(backend_timings(build, [images[0].clamp(0, 1)], list(images.clamp(0, 1)), cfg, size=size))
    return row
