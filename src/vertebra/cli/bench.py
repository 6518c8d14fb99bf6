"""``vertebra list``, ``vertebra info`` and ``vertebra bench``: the registry's networks, one network, measurements."""

from __future__ import annotations

import argparse

from . import _args as A
from ._console import console, err_console

__all__ = ["register", "cmd_list", "cmd_info", "cmd_bench"]


def _fmt(v, spec: str = ".2f", empty: str = "-") -> str:
    return empty if v is None else format(v, spec)


def cmd_list(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from ..backbone import count_params
    from ..bench.measure import count_macs
    from ..registry import backbone_spec, create_backbone, list_backbones

    names = list_backbones(args.family)
    table = Table(title=f"vertebra backbones ({len(names)})", header_style="bold")
    for col, just in (("name", "left"), ("family", "left"), ("input", "right"), ("params (M)", "right"),
                      ("paper (M)", "right"), ("GMACs", "right"), ("paper GMACs", "right"),
                      ("top-1 err", "right"), ("twin", "left"), ("weights", "right")):
        table.add_column(col, justify=just, no_wrap=col == "name")
    for name in names:
        spec = backbone_spec(name)
        with torch.device("meta"):
            model = create_backbone(name)
        params = count_params(model) / 1e6
        gmacs = count_macs(model, spec.input_size).gmacs
        tol = None if spec.paper_params_m is None else spec.paper_params_m * spec.params_tol_pct / 100
        ok = tol is None or abs(params - spec.paper_params_m) <= tol
        sets = spec.weights
        best = max((w.top1 or 0.0 for w in sets), default=0.0)
        weights = "-" if not sets else f"{len(sets)}, top-1 {best:.1f}" if best else str(len(sets))
        table.add_row(
            name, spec.family, "x".join(map(str, spec.input_size[1:])),
            f"[{'green' if ok else 'red'}]{params:.3f}[/]", _fmt(spec.paper_params_m, ".3f"),
            f"{gmacs:.3f}", _fmt(spec.paper_gmacs, ".3f"), _fmt(spec.paper_top1_err, ".2f"), spec.reference or "",
            weights,
        )
    console.print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from ..backbone import count_params
    from ..bench.measure import count_macs
    from ..registry import backbone_spec, create_backbone

    spec = backbone_spec(args.name)
    size = tuple(spec.input_size) if args.size is None else (spec.input_size[0], args.size, args.size)
    with torch.device("meta"):
        model = create_backbone(args.name)
        feats = model.forward_intermediates(torch.empty(1, *size), intermediates_only=True)
    macs = count_macs(model, size)
    params = count_params(model)
    t = Table(title=f"{spec.name}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    rows = [
        ("family", spec.family), ("paper", spec.paper), ("year", str(spec.year or "-")),
        ("arXiv", spec.arxiv or "-"), ("dataset", spec.dataset), ("input size", "x".join(map(str, size))),
        ("min input", f"{model.min_input_size}x{model.min_input_size}"), ("classes", str(spec.num_classes)),
        ("parameters", f"{params:,} ({params / 1e6:.3f}M)"),
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


def check_info(args: argparse.Namespace) -> None:
    A.check_size_for(args.name, {"--size": args.size})


def check_bench(args: argparse.Namespace) -> None:
    from ..devices import default_device
    from ..precision import check_dtype

    device = default_device() if args.device is None else args.device
    try:
        check_dtype(None if args.dtype == "fp32" else args.dtype, device, flag=f"--dtype {args.dtype}")
    except ValueError as e:
        raise A.UsageError("--dtype", str(e).split(": ", 1)[-1]) from None
    for name in args.names:
        if args.task == "cls":
            A.check_size_for(name, {"--size": args.size})


def cmd_bench(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench.measure import BenchConfig
    from ..bench.report import bench_table, write_report
    from ..bench.runner import default_out_dir, plan_bench, run_bench
    from ..devices import default_device

    device = default_device() if args.device is None else args.device
    batch = args.batch if args.batch is not None else 8 if device.startswith("cuda") else 4
    det_size = 512 if args.size is None or args.task == "cls" else args.size
    cfg = BenchConfig(input=args.size if args.task == "cls" else None, batch=batch, device=device,
                      dtype=args.dtype, channels_last=args.channels_last, compile=args.compile, task=args.task,
                      det_size=det_size, eager=args.eager, train=not args.no_train, runs=args.runs,
                      backends=tuple(dict.fromkeys(b for b in args.backend if b != "torch")))
    plan = plan_bench(args.names, cfg, family=args.family, compare=args.compare)
    for msg in plan.notes:
        err_console.print(f"[yellow]{msg}[/]")
    out_dir = Path(args.out) if args.out else default_out_dir()
    console.print(f"measuring the machine's ceiling ({device}, {cfg.dtype} matmul) ...")
    t0 = time.monotonic()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = None
        done: list[dict] = []

        def on_start(name: str, lib: str) -> None:
            nonlocal bar
            if bar is None:
                bar = progress.add_task("bench", total=len(plan.jobs))
            progress.update(bar, description=f"{name} ({lib})")

        def on_row(row: dict) -> None:
            done.append(row)
            name, lib = row["name"], row["library"]
            if row["status"] != "ok":
                progress.console.print(f"[red]{name} ({lib}) failed:[/] {row['error'].splitlines()[0]}")
            progress.advance(bar)
            if not console.is_terminal:  # a log file gets a line per network instead of the live bar
                state = f"{row['throughput_ips']:.1f} img/s" if row["status"] == "ok" else "failed"
                console.print(f"[{len(done)}/{len(plan.jobs)}] {name} ({lib}): {state}, "
                              f"{time.monotonic() - t0:.0f} s")

        run = run_bench(plan, timeout=args.timeout, threads=args.threads, on_start=on_start, on_row=on_row)
    console.print(bench_table(run.rows, f"vertebra bench ({device}, {cfg.dtype}, batch {cfg.batch})"))
    page = write_report(out_dir, run.rows, run.machine, run.config, run.notes)
    console.print(f"{len(run.rows)} measurements in {run.config['wall_seconds']} s; report: [bold]{page.resolve()}[/]")
    return 0 if any(r["status"] == "ok" for r in run.rows) else 1


def register(subparsers) -> None:
    """Add ``list``, ``info`` and ``bench``."""
    from ..bench.runner import MODES

    sp = subparsers.add_parser("list", help="every network with its parameter count and GMACs next to its paper's")
    sp.add_argument("--family", help="only this family (e.g. ResNet)")
    sp.set_defaults(handler=cmd_list)

    sp = subparsers.add_parser("info", help="one network: its spec, size, compute and feature_info")
    sp.add_argument("name", help="a registered network (vertebra list)")
    sp.add_argument("--size", type=A.SIZE, help="square input size (default: the paper's)")
    sp.add_argument("--input", dest="size", action=A.Renamed, new="--size", type=A.SIZE)
    sp.set_defaults(handler=cmd_info, _check=check_info, _parser=sp)

    sp = subparsers.add_parser("bench", help="measure backbones side by side: table, CSV/JSON, plots, HTML report")
    sp.add_argument("names", nargs="*", help="networks (default: one headline variant of each survey network)")
    sp.add_argument("--family", help="every network of one family")
    sp.add_argument("--size", type=A.SIZE,
                    help="square input size (default: each network's paper input; --task det: 512)")
    sp.add_argument("--input", dest="size", action=A.Renamed, new="--size", type=A.SIZE)
    sp.add_argument("--batch", type=A.POSITIVE_INT,
                    help="batch for throughput and the training step (default 4 CPU, 8 CUDA)")
    sp.add_argument("--device", type=A.device, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    sp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="default fp32")
    sp.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=True,
                    help="channels_last memory format (default on)")
    sp.add_argument("--compile", action="store_true", help="torch.compile each model")
    sp.add_argument("--task", default="cls", choices=list(MODES), help="cls: the backbone; det: inside RetinaNet")
    sp.add_argument("--det-size", dest="size", action=A.Renamed, new="--size", type=A.integer(32))
    sp.add_argument("--compare", action="store_true", help="also measure the torchvision/timm twins, with a ratio")
    sp.add_argument("--backend", nargs="+", choices=("torch", "compile", "onnxruntime"), default=["torch"],
                    help="inference backends to time vertebra's networks on, a column each (torch: "
                         "optimize_for_inference, always measured; compile: torch.compile of it; onnxruntime: the "
                         "exported ONNX graph, CPU float32, needs pip install vertebra[onnx])")
    sp.add_argument("--eager", action="store_true", help="vertebra without its inference path (no BN folding)")
    sp.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    sp.add_argument("--runs", type=A.POSITIVE_INT, default=3, help="timed runs per measurement (after warm-up)")
    sp.add_argument("--threads", type=A.POSITIVE_INT, help="torch threads in each measuring process")
    sp.add_argument("--timeout", type=A.POSITIVE, default=900,
                    help="seconds before one network's measurement is abandoned (default 900)")
    sp.add_argument("--out", help="output folder (default reports/bench-DATE-TIME)")
    sp.set_defaults(handler=cmd_bench, _check=check_bench, _parser=sp)
