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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        err_console.print(f"[bold red]error:[/] {msg}")
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
