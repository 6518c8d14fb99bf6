"""The measurements behind three thresholds of vertebra's CPU engine, each against the plain ATen call it replaces.

- ``layers.fused.FusedLinear`` packs its weight (MKL) from ``_PACKED_MIN_ROWS`` rows on: AlexNet's three classifier
  layers (9216 -> 4096 -> 4096 -> 1000, ReLUs between), packed against ``F.linear``, at 1, 2, 4 and 8 rows.
- ``layers.gemm_conv.weight_bound`` (training, bf16 autocast): ResNet-18's layer4 convolutions at a detector's
  training sizes, forward and backward, as one GEMM (``gemm_conv2d``) against ATen's (oneDNN) convolution: the
  3x3 512 -> 512 at 4 x 4 and 8 x 8 output pixels, and the stride-2 256 -> 512 entry, batch 16.
- ``layers.winograd.winograd_trainable`` (training, float32): a 256 -> 256 3x3 convolution, forward and backward,
  batch 2, as ``WinogradConv2d`` (F(4x4)) against ATen's, at 32, 64 and 100 px: below ``_TRAIN_MIN_PIXELS`` the
  transforms cost more than they save.

Each pair is timed alternately (one call of each in turn) and reported as the median of ``--reps`` calls, ms; the
ratio is vertebra's path over ATen's (below 1: faster).

    python benchmarks/engine_thresholds.py
    python benchmarks/engine_thresholds.py --reps 50 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vertebra.layers import fused
from vertebra.layers.fused import FusedLinear
from vertebra.layers.gemm_conv import gemm_conv2d
from vertebra.layers.winograd import WinogradConv2d


def _median_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    for fn in fns.values():  # warm: packed weights, allocator, oneDNN primitives
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _row(what: str, ms: dict[str, float]) -> None:
    ours, aten = ms["vertebra"], ms["aten"]
    print(f"| {what} | {aten:.2f} | {ours:.2f} | {ours / aten:.2f} |", flush=True)


def linear(reps: int) -> None:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(9216, 4096), torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 1000)]
    packed = [FusedLinear(m).eval() for m in layers]

    def run(mods, x):
        with torch.inference_mode():
            for i, m in enumerate(mods):
                x = m(x)
                if i < len(mods) - 1:
                    x = F.relu(x)
        return x

    old, fused._PACKED_MIN_ROWS = fused._PACKED_MIN_ROWS, 1  # the packed product at every row count
    try:
        for rows in (1, 2, 4, 8):
            x = torch.randn(rows, 9216)
            ms = _median_ms({"aten": lambda x=x: run(layers, x), "vertebra": lambda x=x: run(packed, x)}, reps)
            _row(f"AlexNet classifier, {rows} row{'s' if rows > 1 else ''}, packed MKL vs F.linear", ms)
    finally:
        fused._PACKED_MIN_ROWS = old


def _fwd_bwd(conv: Callable, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = conv(x, w)
    y.backward(grad)
    return y


def weight_bound(reps: int) -> None:
    torch.manual_seed(0)
    cases = [("layer4 3x3 512->512, 4 x 4 px", 512, 512, 4, 1), ("layer4 3x3 512->512, 8 x 8 px", 512, 512, 8, 1),
             ("layer4 entry 3x3/2 256->512, 16 -> 8 px", 256, 512, 16, 2)]
    for what, ci, co, size, stride in cases:
        x = torch.randn(16, ci, size, size).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(co, ci, 3, 3) * 0.02).contiguous(memory_format=torch.channels_last)
        out = size // stride
        g = torch.randn(16, co, out, out, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)

        def aten(x=x, w=w, g=g, stride=stride):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _fwd_bwd(lambda a, b: F.conv2d(a, b, None, stride, 1), x, w, g)

        def gemm(x=x, w=w, g=g, stride=stride):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _fwd_bwd(lambda a, b: gemm_conv2d(a, b, None, stride, 1), x, w, g)

        _row(f"bf16 training, {what}, batch 16, GEMM vs oneDNN", _median_ms({"aten": aten, "vertebra": gemm}, reps))


def winograd_training(reps: int) -> None:
    torch.manual_seed(0)
    for size in (32, 64, 100):
        x = torch.randn(2, 256, size, size).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3) * 0.02
        g = torch.randn(2, 256, size, size).contiguous(memory_format=torch.channels_last)
        aten = lambda x=x, w=w, g=g: _fwd_bwd(lambda a, b: F.conv2d(a, b, None, 1, 1), x, w, g)  # noqa: E731
        wino = lambda x=x, w=w, g=g: _fwd_bwd(lambda a, b: WinogradConv2d.apply(a, b, None, (1, 1)), x, w, g)  # noqa: E731
        _row(f"float32 training, 3x3 256->256, {size} x {size} px ({2 * size * size} output px), batch 2, "
             f"Winograd F(4x4) vs oneDNN", _median_ms({"aten": aten, "vertebra": wino}, reps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20, help="timed calls of each side (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, median of {args.reps} calls (ms)\n")
    print("| what | ATen ms | vertebra ms | ratio |\n|---|---|---|---|")
    linear(args.reps)
    if torch.backends.mkldnn.is_available():
        weight_bound(args.reps)
    winograd_training(args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
