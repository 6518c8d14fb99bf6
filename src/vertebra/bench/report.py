"""The benchmark's outputs: the console table, CSV, JSON, plots and one self-contained HTML report.

Every file is written with :func:`vertebra._io.atomic_write`, so a run that is interrupted never
leaves a half-written report.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from .._io import atomic_write

__all__ = ["ROW_COLUMNS", "add_peer_ratios", "bench_table", "write_report", "plot_paper_chart"]

# the columns of a measurement row (results.csv), in order
ROW_COLUMNS = [
    "name", "library", "family", "task", "status", "error", "device", "dtype", "layout", "compile",
    "inference_path", "input", "batch", "params_m", "paper_params_m", "gmacs", "paper_gmacs", "paper_top1_err",
    "latency_ms", "latency_p90_ms", "throughput_ips", "train_ips", "postprocess_ms", "peak_mem_mb",
    "model_mem_mb", "achieved_gmacs_per_s", "peak_fraction", "ratio_vs_peer", "peer", "latency_ms_compile",
    "throughput_ips_compile", "latency_ms_onnxruntime", "throughput_ips_onnxruntime", "unsupported_ops",
    "cpu", "cores", "threads", "gpu", "torch", "torchvision", "cuda",
]


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def rows_to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in ROW_COLUMNS})
    return buf.getvalue()


# -- peer ratios and the console table -----------------------------------------------------


def add_peer_ratios(rows: list[dict]) -> None:
    """Give each successful vertebra row ``ratio_vs_peer`` (its throughput over the fastest successful
    peer's of the same network) and ``peer`` (that library), in place; rows without a peer are left alone."""
    for r in rows:
        if r["library"] != "vertebra" or r["status"] != "ok":
            continue
        peers = [p for p in rows if p["name"] == r["name"] and p["library"] != "vertebra" and p["status"] == "ok"]
        if peers:
            best = max(peers, key=lambda p: p["throughput_ips"])
            r["ratio_vs_peer"] = r["throughput_ips"] / best["throughput_ips"]
            r["peer"] = best["library"]


#: the memory columns: None in a measured row where the platform has no probe (Windows), shown "n/a"
_MEMORY = ("peak_mem_mb", "model_mem_mb")

_TABLE = [("name", "network"), ("library", "lib"), ("input", "input"), ("params_m", "params M"),
          ("gmacs", "GMACs"), ("latency_ms", "lat ms"), ("throughput_ips", "img/s"), ("train_ips", "train img/s"),
          ("peak_mem_mb", "mem MB"), ("peak_fraction", "of peak"), ("ratio_vs_peer", "vs peer")]


#: a column per extra backend (bench --backend), shown where a row has it
_BACKEND_COLUMNS = [("latency_ms_compile", "lat ms compile"), ("latency_ms_onnxruntime", "lat ms ort"),
                    ("throughput_ips_onnxruntime", "img/s ort")]


def bench_table(rows: Sequence[dict], title: str):
    """The rows as a ``rich`` table for the console (a failed row says so and stays empty)."""
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    cols = _TABLE + [(k, h) for k, h in _BACKEND_COLUMNS if any(r.get(k) not in (None, "") for r in rows)]
    for _, head in cols:
        table.add_column(head, justify="left" if head in ("network", "lib") else "right")
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
            elif v is None and key in _MEMORY:  # no memory probe on this platform
                cells.append("n/a")
            else:
                cells.append(str(v))
        table.add_row(*cells)
    return table


# -- plots ---------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def paper_chart_points() -> list[dict]:
    """Every registered network with a paper top-1 error: its GMACs and parameters counted here
    at the paper's input size (built on meta; computed once per process)."""
    return [dict(p) for p in _paper_chart_points()]


@functools.lru_cache(maxsize=1)
def _paper_chart_points() -> tuple[dict, ...]:
    import torch

    from ..backbone import count_params
    from ..registry import backbone_spec, create_backbone, list_backbones
    from .measure import count_macs

    pts = []
    for name in list_backbones():
        spec = backbone_spec(name)
        if spec.paper_top1_err is None or spec.dataset != "imagenet":
            continue
        try:
            with torch.device("meta"):
                model = create_backbone(name)
            pts.append({"name": name, "family": spec.family, "top1_err": spec.paper_top1_err,
                        "gmacs": count_macs(model, spec.input_size).gmacs, "params_m": count_params(model) / 1e6})
        except Exception:  # a network that does not build has no point on the chart
            continue
    return tuple(pts)


def plot_paper_chart(points: list[dict]) -> bytes:
    """The survey's classic chart: paper top-1 error against GMACs, marker area ~ parameters."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(12, 7))
    fams = sorted({p["family"] for p in points})
    cmap = plt.get_cmap("tab20")
    for i, fam in enumerate(fams):
        ps = [p for p in points if p["family"] == fam]
        ax.scatter([p["gmacs"] for p in ps], [p["top1_err"] for p in ps], s=[max(12, 4 * p["params_m"]) for p in ps],
                   alpha=0.6, color=cmap(i % 20), label=fam, edgecolors="black", linewidths=0.5)
        for p in ps:
            ax.annotate(p["name"], (p["gmacs"], p["top1_err"]), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("GMACs at the paper's input size (counted by vertebra)")
    ax.set_ylabel("ImageNet top-1 error (%, as the paper reports it)")
    ax.set_title("Paper top-1 error vs compute (marker area ~ parameters)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=0.5, frameon=False)
    return _png(fig)


def plot_latency(rows: list[dict]) -> bytes | None:
    ours = [r for r in rows if r.get("library") == "vertebra" and r.get("status") == "ok"
            and _num(r.get("latency_ms")) and _num(r.get("gmacs"))]
    if not ours:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.scatter([r["gmacs"] for r in ours], [r["latency_ms"] for r in ours],
               s=[max(12, 3 * (_num(r.get("params_m")) or 1)) for r in ours], alpha=0.6, edgecolors="black",
               linewidths=0.5)
    for r in ours:
        ax.annotate(r["name"], (r["gmacs"], r["latency_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    r0 = ours[0]
    ax.set_xlabel(f"GMACs at the measured input ({r0['task']})")
    ax.set_ylabel("latency at batch 1, median (ms)")
    ax.set_title(f"Measured latency vs compute — {r0['device']}, {r0['dtype']}, {r0['layout']}")
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def plot_ratio(rows: list[dict]) -> bytes | None:
    pairs = [(r["name"], _num(r.get("ratio_vs_peer")), r.get("peer", "")) for r in rows
             if r.get("library") == "vertebra" and _num(r.get("ratio_vs_peer"))]
    if not pairs:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(pairs) + 1.5))
    names = [f"{n} (vs {p})" for n, _, p in pairs]
    vals = [v for _, v, _ in pairs]
    ax.barh(names, vals, color=["tab:green" if v >= 1 else "tab:red" for v in vals])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("vertebra throughput / the faster peer's (same run; > 1: vertebra is faster)")
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


# -- HTML ----------------------------------------------------------------------------------

_DISPLAY = [
    ("name", "network"), ("library", "library"), ("status", "status"), ("input", "input"), ("batch", "batch"),
    ("params_m", "params (M)"), ("paper_params_m", "paper (M)"), ("gmacs", "GMACs"), ("paper_gmacs", "paper GMACs"),
    ("latency_ms", "latency b1 (ms)"), ("latency_p90_ms", "p90 (ms)"), ("throughput_ips", "img/s"),
    ("train_ips", "train img/s"), ("postprocess_ms", "post (ms/img)"), ("peak_mem_mb", "peak mem (MB)"),
    ("peak_fraction", "of peak"), ("ratio_vs_peer", "vs peer"), ("latency_ms_compile", "b1 compile (ms)"),
    ("latency_ms_onnxruntime", "b1 onnxruntime (ms)"), ("throughput_ips_onnxruntime", "onnxruntime img/s"),
]


def _cell(key: str, v) -> str:
    f = _num(v)
    if f is None:
        return "n/a" if v is None and key in _MEMORY else html.escape(str(v if v is not None else ""))
    if key == "peak_fraction":
        return f"{100 * f:.1f}%"
    if key in ("batch",):
        return str(int(f))
    if key in ("ratio_vs_peer",):
        return f"{f:.2f}x"
    return f"{f:.3f}" if abs(f) < 10 else f"{f:.1f}"


def render_html(rows: list[dict], machine: dict, config: dict, plots: dict[str, bytes], notes: list[str]) -> str:
    css = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}"
           "tr.error td{background:#fde8e8}th{background:#f0f0f0;position:sticky;top:0}img{max-width:100%}"
           "code{background:#f4f4f4;padding:1px 4px}")
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>vertebra bench</title><style>{css}</style>"
           "</head><body>", "<h1>vertebra bench</h1>"]
    out.append("<h2>Machine and settings</h2><table>")
    for k, v in list(machine.items()) + list(config.items()):
        out.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>")
    out.append("</table>")
    for n in notes:
        out.append(f"<p>{html.escape(n)}</p>")
    out.append("<h2>Results</h2><table><tr>" + "".join(f"<th>{html.escape(t)}</th>" for _, t in _DISPLAY) + "</tr>")
    for r in rows:
        cls = " class='error'" if r.get("status") != "ok" else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{_cell(k, r.get(k))}</td>" for k, _ in _DISPLAY) + "</tr>")
    out.append("</table>")
    errors = [r for r in rows if r.get("status") != "ok"]
    if errors:
        out.append("<h2>Failures</h2><ul>")
        for r in errors:
            first = str(r.get("error", "")).splitlines()[0] if r.get("error") else ""
            out.append(f"<li><b>{html.escape(r['name'])}</b> ({html.escape(r['library'])}): "
                       f"<code>{html.escape(first)}</code></li>")
        out.append("</ul>")
    titles = {"paper_chart": "Paper top-1 error vs GMACs (the survey's chart)",
              "latency_vs_gmacs": "Measured latency vs GMACs", "ratio": "vertebra vs its peers"}
    for key, png in plots.items():
        b64 = base64.b64encode(png).decode()
        out.append(f"<h2>{html.escape(titles.get(key, key))}</h2><img alt='{key}' src='data:image/png;base64,{b64}'>")
    out.append("<p>Compute is in multiply-adds (MACs). Files: results.csv, results.json and the PNG plots beside "
               "this page.</p></body></html>")
    return "\n".join(out)


def write_report(out_dir: Path, rows: list[dict], machine: dict, config: dict, notes: list[str] | None = None,
                 paper_points: list[dict] | None = None) -> Path:
    """Write results.csv, results.json, the plots and report.html into ``out_dir``; return the HTML path."""
    out_dir = Path(out_dir)
    notes = list(notes or [])
    atomic_write(out_dir / "results.csv", rows_to_csv(rows))
    atomic_write(out_dir / "results.json",
                      json.dumps({"machine": machine, "config": config, "notes": notes, "rows": rows}, indent=1,
                                 default=str))
    plots: dict[str, bytes] = {}
    points = paper_points if paper_points is not None else paper_chart_points()
    if points:
        plots["paper_chart"] = plot_paper_chart(points)
    for key, fn in (("latency_vs_gmacs", plot_latency), ("ratio", plot_ratio)):
        png = fn(rows)
        if png is not None:
            plots[key] = png
    for key, png in plots.items():
        atomic_write(out_dir / f"{key}.png", png)
    page = out_dir / "report.html"
    atomic_write(page, render_html(rows, machine, config, plots, notes))
    return page
