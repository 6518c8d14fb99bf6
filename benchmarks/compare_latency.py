"""Time the trained detectors of a ``vertebra compare`` folder again, one after the other on a quiet machine, on
each inference backend: ``optimize_for_inference`` (torch) and onnxruntime, batch 1 at the comparison's size.

``vertebra compare`` times each detector right after its training, which is what a sequential comparison wants;
when two comparisons run side by side (two seeds at once, one thread each) those latencies carry the other run's
load. This script re-measures them from the checkpoints alone and prints a Markdown table (and ``--json``).

    python benchmarks/compare_latency.py reports/compare-.../ [--threads 2] [--json latency.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a vertebra compare output folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--no-onnxruntime", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vertebra.bench.measure import time_fn
    from vertebra.engine import load_model
    from vertebra.inference import optimize_for_inference

    folder = Path(args.folder)
    settings = json.loads((folder / "compare.json").read_text())["settings"]
    size = int(settings["size"])
    rows = []
    for run in sorted((folder / "runs").iterdir()):
        ck = run / "last.safetensors"
        if not ck.is_file():
            continue
        model, _ = load_model(ck)
        x = [torch.rand(3, size, size)]
        row = {"name": run.name}
        fast = optimize_for_inference(model, inplace=False)
        with torch.inference_mode():
            row["torch_ms"] = time_fn(lambda m=fast, x=x: m(x), warmup=3, runs=args.runs, min_seconds=2.0).median_ms
        if not args.no_onnxruntime:
            try:
                ort = optimize_for_inference(model, backend="onnxruntime", threads=torch.get_num_threads())
                row["onnxruntime_ms"] = time_fn(lambda m=ort, x=x: m(x), warmup=3, runs=args.runs,
                                                min_seconds=2.0).median_ms
            except Exception as e:  # noqa: BLE001 - a network that does not export is a note, not the end
                row["onnxruntime_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
        print(row, flush=True)
    print("\n| backbone | torch (ms) | onnxruntime (ms) | faster |\n|---|---|---|---|")
    for r in rows:
        o = r.get("onnxruntime_ms")
        best = "" if o is None else ("onnxruntime" if o < r["torch_ms"] else "torch")
        print(f"| {r['name']} | {r['torch_ms']:.1f} | {o:.1f} | {best} |" if o is not None
              else f"| {r['name']} | {r['torch_ms']:.1f} | {r.get('onnxruntime_error', '-')} | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "threads": torch.get_num_threads(), "rows": rows},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
