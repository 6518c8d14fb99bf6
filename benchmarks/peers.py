"""Inference throughput of vertebra against torchvision and timm, measured in the same run.

    python benchmarks/peers.py [--batch 8] [--size 224] [--rounds 5] [--nets resnet50 vgg16]

CPU, eval mode, torch.inference_mode, channels_last for every model. vertebra runs its
inference path (``vertebra.inference.optimize_for_inference``: BatchNorm folded into the
convolutions); the peers run as their libraries build them. The three are timed in
interleaved rounds (A, B, C, A, B, C, ...) so a machine that slows down mid-run slows all of
them alike; each figure is the median over rounds, and outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vertebra
from vertebra.inference import optimize_for_inference
from vertebra.reference.twins import build_twin, has_timm

PEERS = {
    "resnet50": ("torchvision:resnet50", "timm:resnet50"),
    "resnext50_32x4d": ("torchvision:resnext50_32x4d", "timm:resnext50_32x4d"),
    "wide_resnet50_2": ("torchvision:wide_resnet50_2", "timm:wide_resnet50_2"),
    "vgg16": ("torchvision:vgg16", "timm:vgg16"),
}


def images_per_second(model, x, iters: int) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        return iters * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(PEERS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2, help="forward passes per round and model")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
          f"channels_last, eval, inference_mode; median of {args.rounds} interleaved rounds")
    header = f"{'network':<18}{'vertebra':>10}{'torchvision':>13}{'timm':>9}{'vs faster peer':>16}"
    print(header + "\n" + "-" * len(header))
    for name in args.nets:
        torch.manual_seed(0)
        models = {}
        for twin in PEERS[name]:
            if twin.startswith("timm") and not has_timm():
                continue
            models[twin.split(":")[0]] = build_twin(twin).eval().to(memory_format=torch.channels_last)
        ours = vertebra.create_backbone(name).eval()
        vertebra.load_reference_weights(ours, models["torchvision"].state_dict(), "torchvision")
        models = {"vertebra": optimize_for_inference(ours), **models}
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = models["torchvision"](x)
            diff = (models["vertebra"](x) - ref).abs().max().item() / ref.abs().max().item()
            for m in models.values():  # warm-up
                m(x)
        rates: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.rounds):
            for k, m in models.items():
                rates[k].append(images_per_second(m, x, args.iters))
        med = {k: statistics.median(v) for k, v in rates.items()}
        peer = max(v for k, v in med.items() if k != "vertebra")
        print(f"{name:<18}{med['vertebra']:>10.1f}{med['torchvision']:>13.1f}{med.get('timm', float('nan')):>9.1f}"
              f"{med['vertebra'] / peer:>15.2f}x   (output diff {diff:.1e} of scale)")
    print("figures are images per second")


if __name__ == "__main__":
    main()
