"""Peak training memory of DenseNet with and without ``memory_efficient=True`` (checkpointed
dense layers), and a check that both give the same outputs and gradients.

Each setting runs in a fresh child process (so one run's allocations cannot hide the other's):
it builds the model, records its resident set size (RSS), runs forward + backward on a random
batch and reports the peak RSS (``getrusage``'s ru_maxrss) and the growth over the baseline,
i.e. the memory the training step itself needed. On a CUDA device the same is measured with
``torch.cuda.max_memory_allocated``.

    python benchmarks/densenet_memory.py                       # densenet121, batch 16, 224 px, CPU
    python benchmarks/densenet_memory.py --model densenet_bc_100_12 --size 32 --batch 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def child(args: argparse.Namespace) -> None:
    import torch

    import vertebra

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = vertebra.create_backbone(args.model, memory_efficient=args.efficient).to(device).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    # a warm-up step on a tiny batch allocates the gradients and the allocator's pools
    model(x[:1]).sum().backward()
    model.zero_grad(set_to_none=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    base_rss = _rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out = model(x)
    loss = out.float().square().mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {
        "model": args.model,
        "memory_efficient": args.efficient,
        "batch": args.batch,
        "size": args.size,
        "step_s": round(dt, 3),
        "baseline_rss_mb": round(base_rss, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_before_step_mb": round(peak_before, 1),
        "loss": float(loss),
        "grad_norm": float(torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))),
    }
    res["step_rss_mb"] = round(res["peak_rss_mb"] - base_rss, 1)
    if device.type == "cuda":
        res["cuda_step_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20 - base, 1)
    print(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet121")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--efficient", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    results = []
    for efficient in (False, True):
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--batch", str(args.batch),
               "--size", str(args.size), "--device", args.device] + (["--efficient"] if efficient else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.device}, one training step")
    print(f"{'setting':<20}{'step s':>8}{'baseline MB':>13}{'peak RSS MB':>13}{'step MB':>10}  loss / grad norm")
    for r in results:
        name = "memory_efficient" if r["memory_efficient"] else "plain"
        extra = f"  cuda {r['cuda_step_peak_mb']} MB" if "cuda_step_peak_mb" in r else ""
        print(f"{name:<20}{r['step_s']:>8.2f}{r['baseline_rss_mb']:>13.1f}{r['peak_rss_mb']:>13.1f}"
              f"{r['step_rss_mb']:>10.1f}  {r['loss']:.6g} / {r['grad_norm']:.6g}{extra}")
    a, b = results
    same = abs(a["loss"] - b["loss"]) <= 1e-6 * max(1.0, abs(a["loss"])) and abs(
        a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"])
    saved = 100 * (1 - b["step_rss_mb"] / a["step_rss_mb"]) if a["step_rss_mb"] > 0 else float("nan")
    print(f"same loss and gradient norm: {same}; the training step needs {saved:.0f}% less memory")


if __name__ == "__main__":
    main()
