"""CPU latency (batch 1) and throughput (batch 8): PyTorch eager vs optimize_for_inference vs onnxruntime.

Networks: resnet50, mobilenet_v2, densenet121, shufflenet_v2_x1_0 at 224 px, and RetinaNet on
resnet18 (its exported graph: network + decoding + NMS, at a 512 px canvas, 80 classes).
Each runtime gets the same number of threads (``--threads``, default torch's). Times are the
median of ``--rounds`` interleaved rounds (each runtime in turn, so that load changes on a shared
machine hit all of them alike). Networks not registered are skipped.

    python benchmarks/export_latency.py [--threads N] [--rounds 5] [--names resnet50 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

import vertebra
from vertebra import export as E
from vertebra.detection import export as DE
from vertebra.inference import optimize_for_inference

BACKBONES = ["resnet50", "mobilenet_v2", "densenet121", "shufflenet_v2_x1_0"]


def _ort(data: bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _timer(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def measure(runners: dict, rounds: int, reps: int) -> dict[str, float]:
    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, fn in runners.items():
            times[k].append(_timer(fn, reps))
    return {k: statistics.median(v) for k, v in times.items()}


def backbone_runners(name: str, batch: int, threads: int):
    torch.manual_seed(0)
    model = vertebra.create_backbone(name).eval()
    fast = optimize_for_inference(model)
    x = torch.randn(batch, 3, 224, 224)
    data = E.export_onnx(model, None, x[:1], dynamic_batch=True)
    sess = _ort(data, threads)
    xn = x.numpy()

    def eager():
        with torch.inference_mode():
            model(x)

    def opt():
        with torch.inference_mode():
            fast(x)

    return {"eager": eager, "optimized": opt, "onnxruntime": lambda: sess.run(None, {"images": xn})}


def retinanet_runners(batch: int, threads: int, size: int = 512):
    from vertebra.detection import create_detector

    torch.manual_seed(0)
    model = create_detector("retinanet", backbone="resnet18", num_classes=80, min_size=size, max_size=size).eval()
    imgs, sizes, _ = E.sample_detection_batch(size, n=batch)
    eager_graph = DE.RetinaNetExport(model, (size, size)).eval()
    fast_graph = DE.RetinaNetExport(optimize_for_inference(model), (size, size)).eval()
    data = DE.export_retinanet_onnx(model, None, size)
    sess = _ort(data, threads)
    feed = {"images": imgs.numpy(), "image_sizes": sizes.numpy()}

    def eager():
        with torch.inference_mode():
            eager_graph(imgs, sizes)

    def opt():
        with torch.inference_mode():
            fast_graph(imgs, sizes)

    return {"eager": eager, "optimized": opt, "onnxruntime": lambda: sess.run(None, feed)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", nargs="*", default=BACKBONES + ["retinanet_resnet18"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    have = set(vertebra.list_backbones())
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"median of {args.rounds} interleaved rounds")
    header = (f"{'network':<20} {'runtime':<12} {'b1 ms':>8} {'b8 img/s':>9} {'b1 vs eager':>12} "
              f"{'b8 vs eager':>12}")
    print(header)
    print("-" * len(header))
    for name in args.names:
        det = name.startswith("retinanet")
        if not det and name not in have:
            print(f"{name:<20} skipped: not registered")
            continue
        try:
            def build(b: int, name: str = name, det: bool = det):
                return retinanet_runners(b, args.threads) if det else backbone_runners(name, b, args.threads)

            lat = measure(build(1), args.rounds, 3 if det else 5)
            thr = measure(build(8), args.rounds, 1 if det else 2)
        except Exception as e:  # one network's failure does not stop the table
            print(f"{name:<20} failed: {type(e).__name__}: {e}")
            continue
        for k in lat:
            ips = 8 / thr[k]
            print(f"{name:<20} {k:<12} {lat[k] * 1e3:8.1f} {ips:9.1f} {lat['eager'] / lat[k]:11.2f}x "
                  f"{thr['eager'] / thr[k]:11.2f}x", flush=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
