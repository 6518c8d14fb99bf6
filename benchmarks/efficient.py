"""Throughput of the efficient networks against their torchvision/timm twins on CPU.

For each network: images per second at batch 1 and 8 (eval mode, ``torch.inference_mode``,
224x224 float32), in both memory layouts (contiguous NCHW and channels_last), for our network
and for each twin. Grouped and depthwise convolutions are slow in channels_last on some CPUs and
fast on others, so each model is run in the faster of the two layouts (measured) and the table
says which; the ratio is ours / twin (above 1: ours is faster) at each one's best layout. Ours and
its twins are timed round-robin, one forward each in turn, so that load from other processes on a
shared machine falls on both sides of the ratio alike, and each figure is the fastest run
(the least disturbed one) of at least 3. Ours gets the first twin's
weights (``load_reference_weights``) and the other twins ours, so all run the same numbers.

    python benchmarks/efficient.py                 # the default set, about 2-3 minutes
    python benchmarks/efficient.py --names mobilenet_v2 mnasnet_b1 --min-time 2
"""

from __future__ import annotations

import argparse
import time

import torch

import vertebra
from vertebra.reference.twins import build_twin, has_timm

# one network per paper; each is timed against its spec's references (its twins)
DEFAULT_NAMES = ["squeezenet1_0", "squeezenet1_1", "mobilenet_v1", "mobilenet_v2", "shufflenet_g3", "shufflenet_g8",
                 "shufflenet_v2_x1_0", "condensenet74_c4_g4", "mnasnet_a1", "mnasnet_b1"]
# twins that are our network only with other arch kwargs (as in tests/test_backbones.py's CONDITIONAL_TWINS):
# timm's MobileNet v1 uses ReLU6, the paper ReLU
CONDITIONAL = {"mobilenet_v1": ({"act": "relu6"}, ["timm:mobilenetv1_100"])}


def row(name: str) -> tuple[str, dict, list[str]]:
    """(registry name, arch kwargs, twins)."""
    kw, twins = CONDITIONAL.get(name, ({}, list(vertebra.backbone_spec(name).references)))
    return name, kw, twins


def measure(models: list, batch: int, size: int, channels_last: bool, min_time: float,
            max_iters: int) -> list[float]:
    """Images per second of each model, timed round-robin (one forward of each in turn), so that
    load from other processes hits ours and the twins alike and the ratio stays meaningful."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = [m.to(memory_format=fmt) for m in models]
    x = torch.randn(batch, 3, size, size).to(memory_format=fmt)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            for _ in range(2):
                m(x)
        start = time.perf_counter()
        while len(times[0]) < max_iters and (time.perf_counter() - start < min_time * len(models) or len(times[0]) < 3):
            for m, ts in zip(models, times):
                t = time.perf_counter()
                m(x)
                ts.append(time.perf_counter() - t)
    for m in models:
        m.to(memory_format=torch.contiguous_format)
    # the fastest run: on a shared machine, the one least disturbed by other processes
    return [batch / min(ts) for ts in times]


def best_layouts(models, batch, size, min_time, max_iters) -> list[tuple[float, str]]:
    """Each model at its faster layout: (images per second, "NCHW" | "NHWC")."""
    nchw = measure(models, batch, size, False, min_time, max_iters)
    nhwc = measure(models, batch, size, True, min_time, max_iters)
    return [(b, "NHWC") if b > a else (a, "NCHW") for a, b in zip(nchw, nhwc)]


def _reference_state_dict(ours, twin) -> dict:
    """Our weights in the twin's names (pairing tensor by tensor: the twins keep our order)."""
    mine = list(ours.state_dict().values())
    keys = list(twin.state_dict())
    return dict(zip(keys, mine))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", nargs="*", help="registry names (default: one per paper)")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--min-time", type=float, default=0.6, help="seconds of timed runs per measurement")
    ap.add_argument("--max-iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [row(n) for n in (args.names or DEFAULT_NAMES)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, float32, "
          f"eval + inference_mode; img/s at the faster layout (NCHW or NHWC = channels_last)")
    header = f"{'network':22s} {'model':28s}" + "".join(f" {'b' + str(b) + ' img/s':>11s} {'layout':>6s} {'ratio':>6s}"
                                                        for b in args.batches)
    print(header)
    print("-" * len(header))
    for name, kw, twins in rows:
        ours = vertebra.create_backbone(name, **kw).eval()
        built = []
        for ref in twins:
            if ref.startswith("timm:") and not has_timm():
                print(f"{'':22s} {ref:28s} (timm not installed)")
                continue
            built.append((ref, build_twin(ref).eval()))
        if built:  # same numbers in both: ours gets the first twin's weights
            ref, twin = built[0]
            vertebra.load_reference_weights(ours, twin.state_dict(), source=ref.split(":", 1)[0])
            for _, other in built[1:]:
                other.load_state_dict(_reference_state_dict(ours, other))
        models = [ours] + [twin for _, twin in built]
        per_batch = {b: best_layouts(models, b, args.size, args.min_time, args.max_iters) for b in args.batches}
        labels = ["vertebra"] + [ref for ref, _ in built]
        for i, label in enumerate(labels):
            line = f"{name if i == 0 else '':22s} {label:28s}"
            for b in args.batches:
                ips, layout = per_batch[b][i]
                ratio = f"{per_batch[b][0][0] / ips:6.2f}" if i else ""
                line += f" {ips:11.1f} {layout:>6s} {ratio:>6s}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
