"""Inference speed of every vertebra network that has a torchvision or timm twin, against the twin, in one run.

For each network of the registry with a twin (``BackboneSpec.references``, and the twins that need a build
argument of ours: ``reference.twins.TWIN_BUILD_KWARGS``): images per second at batch 1 and batch 8, float32, CPU,
eval mode, ``torch.inference_mode``, at the network's paper input size. vertebra runs its inference path
(``optimize_for_inference``: BatchNorm folded, conv + activation fused), the twins run as their libraries build
them; each of them runs in both memory layouts (NCHW and channels_last) and is scored at its faster one. All the
variants of one network are timed round-robin (one forward of each in turn), so that load from other processes
falls on every side of a ratio alike; each figure is the fastest of the timed runs (the least disturbed one).
The ratio is vertebra's images per second over the faster twin's (above 1: vertebra is faster). Before timing,
vertebra's optimised outputs are checked against each twin's with the twin's weights loaded
(``load_reference_weights``): the ``diff`` column is the largest difference relative to the output's scale.

    python benchmarks/peers.py                          # every twin, batch 1 and 8 (about 20 min on 2 cores)
    python benchmarks/peers.py --nets resnet50 mobilenet_v2 --batches 1
    python benchmarks/peers.py --json reports/peers.json --markdown
    python benchmarks/peers.py --profile resnet18 --batches 8   # operators of vertebra and its twin, by time
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

import vertebra
from vertebra.inference import optimize_for_inference
from vertebra.reference.twins import TWIN_BUILD_KWARGS, build_twin, has_timm

LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


def rows(names: list[str] | None) -> list[tuple[str, dict, list[str]]]:
    """(registry name, build arguments, twins) for every network with a twin, or for ``names``."""
    out = []
    for name in vertebra.list_backbones():
        if names and name not in names:
            continue
        spec = vertebra.backbone_spec(name)
        conditional = {t: kw for (n, t), kw in TWIN_BUILD_KWARGS.items() if n == name}
        plain = [t for t in spec.references if t not in conditional]
        if plain:
            out.append((name, {}, plain))
        groups: dict[str, list[str]] = {}
        for twin, kw in conditional.items():
            groups.setdefault(json.dumps(kw, sort_keys=True), []).append(twin)
        out += [(name, json.loads(kw), twins) for kw, twins in groups.items()]
    missing = sorted(set(names or ()) - {r[0] for r in out})
    if missing:
        raise SystemExit(f"no torchvision/timm twin for {', '.join(missing)}")
    return out


def _timm_ok(twin: str) -> bool:
    return not twin.startswith("timm:") or has_timm()


def check_outputs(name: str, kw: dict, twins: list[str], x: torch.Tensor) -> dict[str, float]:
    """For each twin: vertebra's optimised network with the twin's weights against the twin, the largest output
    difference relative to the twin output's largest magnitude."""
    diffs = {}
    for ref in twins:
        torch.manual_seed(1)
        twin = build_twin(ref).eval()
        ours = vertebra.create_backbone(name, **kw).eval()
        vertebra.load_reference_weights(ours, twin.state_dict(), source=ref.split(":", 1)[0])
        fast = optimize_for_inference(ours)
        with torch.inference_mode():
            want = twin(x)
            diffs[ref] = ((fast(x) - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    return diffs


def variants(name: str, kw: dict, twins: list[str]) -> dict[tuple[str, str], torch.nn.Module]:
    """(model, layout) -> module: vertebra's inference path and each twin, in both layouts."""
    torch.manual_seed(0)
    ours = vertebra.create_backbone(name, **kw).eval()
    first = build_twin(twins[0]).eval()
    vertebra.load_reference_weights(ours, first.state_dict(), source=twins[0].split(":", 1)[0])
    out = {("vertebra", "NCHW"): optimize_for_inference(ours, channels_last=False),
           ("vertebra", "NHWC"): optimize_for_inference(ours, channels_last=True)}
    for ref in twins:
        twin = first if ref == twins[0] else build_twin(ref).eval()
        out[(ref, "NCHW")] = twin
        out[(ref, "NHWC")] = copy.deepcopy(twin).to(memory_format=torch.channels_last)
    return out


def time_round_robin(models: dict, x: torch.Tensor, min_time: float, min_runs: int, max_runs: int) -> dict:
    """Images per second of each (model, layout): the fastest of its runs, the models taking turns."""
    inputs = {key: x.contiguous(memory_format=LAYOUTS[key[1]]) for key in models}
    best = {key: math.inf for key in models}
    with torch.inference_mode():
        for key, m in models.items():  # warm-up: oneDNN primitives, allocator
            m(inputs[key])
            m(inputs[key])
        start, runs = time.perf_counter(), 0
        while runs < max_runs and (runs < min_runs or time.perf_counter() - start < min_time * len(models)):
            for key, m in models.items():
                t = time.perf_counter()
                m(inputs[key])
                best[key] = min(best[key], time.perf_counter() - t)
            runs += 1
    return {key: x.shape[0] / t for key, t in best.items()}


def profile(name: str, kw: dict, twins: list[str], batch: int, top: int) -> None:
    """Operators by self CPU time of vertebra's inference path and of each twin, each at its faster layout."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    size = vertebra.backbone_spec(name).input_size
    x = torch.randn(batch, *size)
    models = variants(name, kw, twins)
    rates = time_round_robin(models, x, 0.5, 3, 20)
    for who in ["vertebra", *twins]:
        layout = max(LAYOUTS, key=lambda lay: rates[(who, lay)])
        m, xi = models[(who, layout)], x.contiguous(memory_format=LAYOUTS[layout])
        with torch.inference_mode():
            m(xi)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    m(xi)
        print(f"\n== {name} {who} ({layout}, batch {batch}): {rates[(who, layout)]:.1f} img/s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def markdown(results: list[dict], batches: list[int]) -> str:
    head = "| network | twins | " + " | ".join(
        f"b{b} vertebra img/s | b{b} twin img/s | b{b} ratio" for b in batches) + " | diff |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [r["network"] + (f" ({', '.join(f'{k}={v}' for k, v in r['kwargs'].items())})" if r["kwargs"] else ""),
                 ", ".join(r["twins"])]
        for b in batches:
            m = r["batches"][str(b)]
            cells += [f"{m['vertebra']:.1f} {m['vertebra_layout']}", f"{m['peer']:.1f} {m['peer_layout']} "
                      f"({m['peer_name'].split(':')[0]})", f"**{m['ratio']:.2f}**" if m["ratio"] < 1 else
                      f"{m['ratio']:.2f}"]
        cells.append(f"{max(r['diff'].values()):.0e}")
        lines.append("| " + " | ".join(cells) + " |")
    for b in batches:
        ratios = [r["batches"][str(b)]["ratio"] for r in results]
        low = min(results, key=lambda r: r["batches"][str(b)]["ratio"])
        lines.append(f"\nbatch {b}: geometric mean {geomean(ratios):.2f}x, minimum {min(ratios):.2f}x "
                     f"({low['network']}), {sum(v < 1 for v in ratios)} of {len(ratios)} below 1.0x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", help="registry names (default: every network with a twin)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timed runs per variant and batch")
    ap.add_argument("--min-runs", type=int, default=3)
    ap.add_argument("--max-runs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown at the end")
    ap.add_argument("--profile", metavar="NET", help="operator profile of NET and its twins instead of the table")
    ap.add_argument("--top", type=int, default=15, help="operators shown by --profile")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        for name, kw, twins in rows([args.profile]):
            for b in args.batches:
                profile(name, kw, [t for t in twins if _timm_ok(t)], b, args.top)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, eval + inference_mode; "
          f"img/s at each model's faster layout; ratio = vertebra / faster twin")
    header = f"{'network':26s}" + "".join(f" {'b' + str(b) + ' ours':>10s} {'twin':>9s} {'ratio':>6s}"
                                          for b in args.batches) + "  diff     faster twin"
    print(header + "\n" + "-" * len(header), flush=True)
    results = []
    for name, kw, twins in rows(args.nets):
        twins = [t for t in twins if _timm_ok(t)]
        if not twins:
            print(f"{name:26s} (its twin needs timm, which is not installed)")
            continue
        size = vertebra.backbone_spec(name).input_size
        diff = check_outputs(name, kw, twins, torch.randn(2, *size))
        models = variants(name, kw, twins)
        entry = {"network": name, "kwargs": kw, "twins": twins, "input": list(size), "diff": diff, "batches": {}}
        line = f"{name + ('*' if kw else ''):26s}"
        for b in args.batches:
            rates = time_round_robin(models, torch.randn(b, *size), args.min_time, args.min_runs, args.max_runs)
            best = {who: max(LAYOUTS, key=lambda lay, w=who: rates[(w, lay)]) for who in ["vertebra", *twins]}
            peer = max(twins, key=lambda t: rates[(t, best[t])])
            ours, theirs = rates[("vertebra", best["vertebra"])], rates[(peer, best[peer])]
            entry["batches"][str(b)] = {
                "vertebra": ours, "vertebra_layout": best["vertebra"], "peer": theirs, "peer_layout": best[peer],
                "peer_name": peer, "ratio": ours / theirs,
                "all": {f"{who} {lay}": v for (who, lay), v in rates.items()}}
            line += f" {ours:10.1f} {theirs:9.1f} {ours / theirs:6.2f}"
        results.append(entry)
        print(f"{line}  {max(diff.values()):.0e}  {peer}", flush=True)
        del models
    for b in args.batches:
        ratios = [r["batches"][str(b)]["ratio"] for r in results]
        print(f"batch {b}: geometric mean {geomean(ratios):.3f}x, minimum {min(ratios):.3f}x over {len(ratios)} "
              f"networks, {sum(v < 1 for v in ratios)} below 1.0x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "batches": args.batches, "results": results}, indent=1))
    if args.markdown:
        print("\n" + markdown(results, args.batches))


if __name__ == "__main__":
    main()
