"""The ``vertebra`` command."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

# wide tables stay readable when the output goes to a file or a pipe
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _fmt(v, spec: str = ".2f", empty: str = "-") -> str:
    return empty if v is None else format(v, spec)


def cmd_list(args) -> int:
    import torch

    from .bench.measure import count_macs, count_params
    from .registry import backbone_spec, create_backbone, list_backbones

    names = list_backbones(args.family)
    table = Table(title=f"vertebra backbones ({len(names)})", header_style="bold")
    for col, just in (("name", "left"), ("family", "left"), ("input", "right"), ("params (M)", "right"),
                      ("paper (M)", "right"), ("GMACs", "right"), ("paper GMACs", "right"),
                      ("top-1 err", "right"), ("twin", "left")):
        table.add_column(col, justify=just, no_wrap=col == "name")
    for name in names:
        spec = backbone_spec(name)
        with torch.device("meta"):
            model = create_backbone(name)
        params = count_params(model) / 1e6
        gmacs = count_macs(model, spec.input_size).gmacs
        tol = None if spec.paper_params_m is None else spec.paper_params_m * spec.params_tol_pct / 100
        ok = tol is None or abs(params - spec.paper_params_m) <= tol
        table.add_row(
            name, spec.family, "x".join(map(str, spec.input_size[1:])),
            f"[{'green' if ok else 'red'}]{params:.3f}[/]", _fmt(spec.paper_params_m, ".3f"),
            f"{gmacs:.3f}", _fmt(spec.paper_gmacs, ".3f"), _fmt(spec.paper_top1_err, ".2f"), spec.reference or "",
        )
    console.print(table)
    return 0


def cmd_info(args) -> int:
    import torch

    from .bench.measure import count_macs, count_params
    from .registry import backbone_spec, create_backbone

    spec = backbone_spec(args.name)
    size = tuple(spec.input_size) if args.input is None else (spec.input_size[0], args.input, args.input)
    with torch.device("meta"):
        model = create_backbone(args.name)
        feats = model.forward_features(torch.empty(1, *size))
    macs = count_macs(model, size)
    t = Table(title=f"{spec.name}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    rows = [
        ("family", spec.family), ("paper", spec.paper), ("year", str(spec.year or "-")),
        ("arXiv", spec.arxiv or "-"), ("dataset", spec.dataset), ("input size", "x".join(map(str, size))),
        ("min input", f"{model.min_input_size}x{model.min_input_size}"), ("classes", str(spec.num_classes)),
        ("parameters", f"{count_params(model):,} ({count_params(model) / 1e6:.3f}M)"),
        ("paper parameters", f"{_fmt(spec.paper_params_m, '.3f')}M (tolerance {spec.params_tol_pct}%)"),
        ("GMACs", f"{macs.gmacs:.3f} at {'x'.join(map(str, size))}"),
        ("paper GMACs", _fmt(spec.paper_gmacs, ".3f")),
        ("paper top-1 / top-5 err", f"{_fmt(spec.paper_top1_err)} / {_fmt(spec.paper_top5_err)}"),
        ("paper CIFAR err", spec.paper_cifar_err or "-"),
        ("twin", spec.reference or "-"), ("figure source", spec.source or "-"),
    ]
    if macs.unsupported:
        rows.append(("ops without a MAC formula", ", ".join(macs.unsupported)))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    ft = Table(title="feature_info", header_style="bold")
    for col in ("stage", "name", "channels", "stride", f"size at {size[1]}x{size[2]}"):
        ft.add_column(col, justify="left" if col in ("name",) else "right")
    for i, (info, f) in enumerate(zip(model.feature_info, feats)):
        ft.add_row(str(i), info.name, str(info.channels), str(info.stride), f"{f.shape[-2]}x{f.shape[-1]}")
    console.print(ft)
    return 0


def cmd_bench(args) -> int:
    import time
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench.measure import BenchConfig, check_config, machine_info, peak_gmacs_per_s
    from .bench.report import write_report
    from .bench.runner import base_row, default_out_dir, headline_names, peers_of, run_isolated, validate_names
    from .reference.twins import has_timm
    from .registry import list_backbones

    device = args.device
    cfg = BenchConfig(input=args.input, batch=args.batch or (8 if device.startswith("cuda") else 4), device=device,
                      dtype=args.dtype, channels_last=args.channels_last, compile=args.compile, task=args.task,
                      det_size=args.det_size, eager=args.eager, train=not args.no_train, runs=args.runs)
    check_config(cfg)
    if args.names:
        names = list(dict.fromkeys(args.names))
    elif args.family:
        names = list_backbones(args.family)
    else:
        names = headline_names()
    validate_names(names, cfg)
    notes = []
    if args.compare and cfg.task == "det":
        raise ValueError("--compare measures classification twins; use it with --task cls")
    if args.compare and not has_timm():
        msg = "timm is not installed: the timm twins are left out of the comparison (pip install timm)"
        err_console.print(f"[yellow]{msg}[/]")
        notes.append(msg)
    out_dir = Path(args.out) if args.out else default_out_dir()
    machine = machine_info(device)
    console.print(f"measuring the machine's ceiling ({device}, {cfg.dtype} matmul) ...")
    peak = peak_gmacs_per_s(device, cfg.dtype)
    notes.append(f"machine ceiling: {peak:.1f} GMAC/s ({cfg.dtype} large matmul on {device}, the faster of "
                 "BLAS and oneDNN on CPU, best of 5)")
    jobs = [(n, "vertebra") for n in names]
    if args.compare:
        jobs = [(n, lib) for n in names for lib in ["vertebra", *peers_of(n)]]
    rows: list[dict] = []
    t0 = time.monotonic()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("bench", total=len(jobs))
        for name, lib in jobs:
            progress.update(task, description=f"{name} ({lib})")
            row = base_row(name, lib, cfg, machine)
            status, payload = run_isolated(name, lib, cfg, timeout=args.timeout, threads=args.threads)
            if status == "ok":
                row.update(payload, status="ok")
                ach = row.get("achieved_gmacs_per_s")
                row["peak_fraction"] = ach / peak if ach and peak else ""
            else:
                row.update(status="error", error=payload)
                progress.console.print(f"[red]{name} ({lib}) failed:[/] {payload.splitlines()[0]}")
            rows.append(row)
            progress.advance(task)
            if not console.is_terminal:  # a log file gets a line per network instead of the live bar
                done = f"{row['throughput_ips']:.1f} img/s" if status == "ok" else "failed"
                console.print(f"[{len(rows)}/{len(jobs)}] {name} ({lib}): {done}, {time.monotonic() - t0:.0f} s")
    for r in rows:
        if r["library"] != "vertebra" or r["status"] != "ok":
            continue
        peers = [p for p in rows if p["name"] == r["name"] and p["library"] != "vertebra" and p["status"] == "ok"]
        if peers:
            best = max(peers, key=lambda p: p["throughput_ips"])
            r["ratio_vs_peer"] = r["throughput_ips"] / best["throughput_ips"]
            r["peer"] = best["library"]
    config = {"names": " ".join(names), "input": cfg.input or "paper", "batch": cfg.batch, "device": device,
              "dtype": cfg.dtype, "layout": "channels_last" if cfg.channels_last else "NCHW", "compile": cfg.compile,
              "task": cfg.task, "compare": args.compare, "wall_seconds": round(time.monotonic() - t0, 1)}
    table = Table(title=f"vertebra bench ({device}, {cfg.dtype}, batch {cfg.batch})", header_style="bold")
    cols = [("name", "network"), ("library", "lib"), ("input", "input"), ("params_m", "params M"),
            ("gmacs", "GMACs"), ("latency_ms", "lat ms"), ("throughput_ips", "img/s"), ("train_ips", "train img/s"),
            ("peak_mem_mb", "mem MB"), ("peak_fraction", "of peak"), ("ratio_vs_peer", "vs peer")]
    for _, title in cols:
        table.add_column(title, justify="left" if title in ("network", "lib") else "right")
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["name"], r["library"], "[red]failed[/]", *[""] * (len(cols) - 3))
            continue
        cells = []
        for key, _ in cols:
            v = r.get(key, "")
            if key == "peak_fraction" and v != "":
                cells.append(f"{100 * v:.1f}%")
            elif key == "ratio_vs_peer" and v != "":
                cells.append(f"{v:.2f}x")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
            else:
                cells.append(str(v))
        table.add_row(*cells)
    console.print(table)
    page = write_report(out_dir, rows, machine, config, notes)
    console.print(f"{len(rows)} measurements in {config['wall_seconds']} s; report: [bold]{page.resolve()}[/]")
    ok = sum(r["status"] == "ok" for r in rows)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vertebra", description="The classic CNN backbones of object detection.")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("list", help="every network with its parameter count and GMACs next to its paper's")
    sp.add_argument("--family", help="only this family (e.g. ResNet)")
    sp.set_defaults(fn=cmd_list)

    sp = sub.add_parser("info", help="one network: its spec, size, compute and feature_info")
    sp.add_argument("name")
    sp.add_argument("--input", type=int, help="square input size (default: the paper's)")
    sp.set_defaults(fn=cmd_info)

    sp = sub.add_parser("bench", help="measure backbones side by side: table, CSV/JSON, plots, HTML report")
    sp.add_argument("names", nargs="*", help="networks (default: one headline variant of each survey network)")
    sp.add_argument("--family", help="every network of one family")
    sp.add_argument("--input", type=int, help="square input size (default: each network's paper input)")
    sp.add_argument("--batch", type=int, help="batch for throughput and the training step (default 4 CPU, 8 CUDA)")
    sp.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    sp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    sp.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=True,
                    help="channels_last memory format (default on)")
    sp.add_argument("--compile", action="store_true", help="torch.compile each model")
    sp.add_argument("--task", default="cls", choices=["cls", "det"], help="cls: the backbone; det: inside RetinaNet")
    sp.add_argument("--det-size", type=int, default=512, help="detection input size (--task det)")
    sp.add_argument("--compare", action="store_true", help="also measure the torchvision/timm twins, with a ratio")
    sp.add_argument("--eager", action="store_true", help="vertebra without its inference path (no BN folding)")
    sp.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    sp.add_argument("--runs", type=int, default=3, help="timed runs per measurement (after warm-up)")
    sp.add_argument("--threads", type=int, help="torch threads in each measuring process")
    sp.add_argument("--timeout", type=float, default=900, help="seconds before one network's measurement is abandoned")
    sp.add_argument("--out", help="output folder (default reports/bench-DATE-TIME)")
    sp.set_defaults(fn=cmd_bench)

    from .engine.commands import register_commands

    register_commands(sub)

    from .export import register_commands as add_export_commands

    add_export_commands(sub)

    from .data.shapes import add_shapes_parser

    sp = sub.add_parser("data", help="data sets: write the built-in shapes set")
    add_shapes_parser(sp.add_subparsers(dest="data_command", required=True))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        fn = getattr(args, "fn", None) or args.func
        return int(fn(args) or 0)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        err_console.print(f"[bold red]error:[/] {msg}")
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
