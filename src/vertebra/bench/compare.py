"""``vertebra compare``: the survey's experiment. Every backbone of a list is trained as a RetinaNet under one budget
(equal training time on this machine, or equal steps), on one data set, with one preset and seed, then evaluated
(COCO AP, AP50, AP75, APs/m/l) and timed as a detector (batch 1, ``optimize_for_inference``), next to its
parameters, multiply-adds and training images/s.

Each backbone trains in a process of its own (``python -m vertebra.bench.compare CHILD.json``), so that a crash or an
out-of-memory is that row's error and the run goes on; on Linux a child dies with its parent (a killed comparison
leaves no orphan holding a run folder). Each child writes ``runs/<name>/row.json`` when it is done and the parent
rewrites ``results.csv``, ``results.json`` and ``report.html`` after every backbone. ``compare.json`` holds the
settings: running the same command again reuses every finished row and trains only the rest; other settings in the
same folder are refused. With several CUDA devices one backbone runs per device at a time.

A backbone the detector cannot take (LeNet-5 and the CIFAR networks never reach stride 8, which P3 needs; an input
below the network's minimum; for fine-tuning, a network without published weights) is listed with the reason, not
trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import _num

__all__ = ["QUICK", "CompareConfig", "ComparePlan", "plan_compare", "run_compare", "detector_problem",
           "pareto_front", "kendall_tau", "compare_table_rows", "write_compare_report", "default_out_dir"]

#: the quick comparison (``make run``): eight families, the cheap member of each
QUICK = ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "mnasnet_a1", "squeezenet1_1", "googlenet",
         "densenet121", "mobilenet_v1"]

#: the metrics a finished row holds (COCO box AP at the evaluation size)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class CompareConfig:
    """The settings every backbone of a comparison shares. ``minutes``: training time per backbone (``steps``
    instead: optimizer steps); ``preset``: ``scratch`` (random init) or ``finetune`` (each network's published
    weights); ``curve_points``: evaluations during training (AP50 against minutes), on ``val_limit`` images."""

    source: dict[str, Any] = field(default_factory=dict)  # a DataSource as a dict; empty: the built-in shapes set
    size: int = 128
    minutes: float | None = 1.0
    steps: int | None = None
    seed: int = 0
    preset: str = "scratch"
    batch: int = 8
    val_limit: int | None = 100
    curve_points: int = 3
    device: str = "cpu"
    threads: int | None = None
    workers: int = 0

    #: what may differ between two invocations that share their finished rows
    _RUNTIME = ("threads", "workers")

    def key(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self._RUNTIME}

    def budget(self) -> str:
        return f"{self.minutes:g} min of training" if self.steps is None else f"{self.steps} steps"

    def check(self) -> None:
        if (self.minutes is None) == (self.steps is None):
            raise ValueError("give the budget as minutes or as steps (one of them)")
        if self.preset not in ("scratch", "finetune"):
            raise ValueError(f"preset must be scratch or finetune, got {self.preset!r}")


def default_out_dir(cfg: CompareConfig) -> Path:
    """``reports/compare-<data>-<budget>-s<seed>-<hash>``: the same command finds the same folder (and resumes)."""
    src = cfg.source
    data = Path(src.get("data") or src.get("coco_ann") or src.get("voc") or "shapes").stem or "data"
    budget = f"{cfg.minutes:g}min" if cfg.steps is None else f"{cfg.steps}steps"
    digest = hashlib.sha256(json.dumps(cfg.key(), sort_keys=True).encode()).hexdigest()[:6]
    return Path("reports") / f"compare-{data}-{cfg.preset}-{budget}-{cfg.size}px-s{cfg.seed}-{digest}"


def detector_problem(name: str, size: int, preset: str = "scratch") -> str | None:
    """Why ``name`` cannot be compared as a detector at ``size`` (None: it can): no stride-8 level (P3), an input
    below its minimum, or (``finetune``) no published weights."""
    import torch

    from ..detection import create_detector
    from ..registry import create_backbone

    try:
        with torch.device("meta"):
            bb = create_backbone(name, features_only=True)
            create_detector("retinanet", backbone=name, num_classes=2, min_size=size, max_size=size)
    except (ValueError, TypeError, RuntimeError) as e:
        return str(e).split("\n")[0]
    if size < bb.min_input_size:
        return f"its smallest input is {bb.min_input_size} px, the comparison runs at {size} (a larger --size)"
    if preset == "finetune":
        from ..hub import has_weights

        if not has_weights(name):
            return "no published weights to fine-tune (compare it with --preset scratch)"
    return None


@dataclass
class ComparePlan:
    cfg: CompareConfig
    names: list[str]
    excluded: dict[str, str]  # name -> why it is not trained
    out: Path


def plan_compare(names: list[str] | None, cfg: CompareConfig, *, family: str | None = None, survey: bool = False,
                 out: str | os.PathLike | None = None) -> ComparePlan:
    """Check the request before anything trains: the names (KeyError with the closest), the settings, which
    backbones can be detectors. ``names`` empty: ``family``'s networks, the survey's headline set (``survey``), or
    :data:`QUICK`."""
    from ..registry import backbone_spec, list_backbones
    from .runner import headline_names

    cfg.check()
    if cfg.source.get("coco_ann") and not cfg.source.get("val_coco_ann"):
        raise ValueError("a comparison scores each backbone on validation data: give --val-coco (and --val-images)")
    if names:
        names = list(dict.fromkeys(names))
    elif family:
        names = list_backbones(family)
    elif survey:
        names = headline_names()
    else:
        names = list(QUICK)
    for n in names:
        backbone_spec(n)
    excluded = {}
    for n in names:
        why = detector_problem(n, cfg.size, cfg.preset)
        if why:
            excluded[n] = why
    out_dir = Path(out) if out is not None else default_out_dir(cfg)
    saved = out_dir / "compare.json"
    if saved.is_file():
        try:
            old = json.loads(saved.read_text(encoding="utf-8")).get("settings")
        except (OSError, ValueError):
            old = None
        if old is not None and old != cfg.key():
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in cfg.key().items() if old.get(k) != v)
            raise ValueError(f"{out_dir} holds a comparison with other settings ({diff}); give another --out or "
                             "the same settings to continue it")
    return ComparePlan(cfg, names, excluded, out_dir)


# --------------------------------------------------------------------------------------------- one backbone (child)


def _child(spec_path: str) -> int:
    """Train, evaluate and time one backbone as the spec file says; write ``row.json`` beside it."""
    import torch

    from .._io import atomic_write
    from ..data.sources import DataSource
    from ..engine.config import TrainConfig
    from ..engine.train import Trainer

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    _die_with_parent(spec.get("parent_pid"))
    c = CompareConfig(**spec["config"])
    name, run_dir = spec["name"], Path(spec["run_dir"])
    if c.threads:
        torch.set_num_threads(int(c.threads))
    every = c.minutes / c.curve_points if c.minutes is not None and c.curve_points > 1 else None
    cfg = TrainConfig(task="det", source=DataSource.from_dict(c.source), size=c.size, backbone=name, preset=c.preset,
                      pretrained="default" if c.preset == "finetune" else None, seed=c.seed, batch=c.batch,
                      threads=c.threads, workers=c.workers, val_limit=c.val_limit, max_minutes=c.minutes,
                      max_steps=c.steps, epochs=10_000 if c.minutes is not None else 12, eval_every=10**6,
                      eval_every_minutes=every, device=spec.get("device", c.device), out=str(run_dir),
                      exist_ok=True, progress=False, log_every=10)
    from ..engine.presets import apply_preset, explicit_fields

    # the comparison's batch is its own setting (every backbone the same), even where it equals TrainConfig's
    # default: the preset fills the rest (its learning rate per image follows this batch)
    cfg = apply_preset(cfg, explicit=explicit_fields(cfg) | {"batch"})
    from rich.console import Console

    t0 = time.perf_counter()
    trainer = Trainer(cfg, console=Console(width=160, no_color=True, highlight=False))
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    wall = time.perf_counter() - t0
    final = dict(trainer.last_eval or {})
    if not final:  # stopped at an epoch end that evaluated, or a steps budget that finished its epochs
        final = trainer.evaluate()
    curve = [[float(r["train_minutes"]), float(r["AP50"])] for r in trainer.rows
             if r.get("kind") == "eval" and r.get("AP50") not in (None, "")]
    row = {"name": name, "status": "ok", **{k: final.get(k) for k in METRICS},
           "steps": summary["steps"], "train_minutes": trainer.train_seconds / 60,
           "train_ips": summary["steps"] * trainer.plan.global_batch / max(trainer.train_seconds, 1e-9),
           "wall_minutes": wall / 60, "curve": curve, "preset": trainer.cfg.preset,
           "anchors": (trainer.anchor_fit or {}).get("describe", ""), "init": trainer.init.get("mode", "")}
    row.update(_time_detector(trainer, c.size))
    atomic_write(run_dir / "row.json", json.dumps(row, indent=1) + "\n")
    return 0


def _time_detector(trainer, size: int) -> dict[str, Any]:
    """Parameters, GMACs (the network at ``size`` x ``size``) and the batch-1 latency of the trained detector as
    ``predict`` runs it (``optimize_for_inference``: BatchNorm folded, fused, channels_last)."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..backbone import count_params
    from ..inference import optimize_for_inference
    from .measure import time_fn

    model = trainer.model
    ema = trainer.ema
    with ema.applied_to(model) if ema is not None else contextlib.nullcontext():
        det = copy.deepcopy(model).eval()
    params = count_params(det) / 1e6
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        det.net(torch.zeros(1, 3, size, size, device=trainer.device))
    gmacs = counter.get_total_flops() / 2e9
    det = optimize_for_inference(det, inplace=True)
    x = [torch.rand(3, size, size, device=trainer.device)]
    with torch.inference_mode():
        t = time_fn(lambda: det(x), device=trainer.device, warmup=2, runs=5, min_seconds=1.0)
    return {"params_m": params, "gmacs": gmacs, "latency_ms": t.median_ms}


# --------------------------------------------------------------------------------------------- the run (parent)


def _die_with_parent(parent_pid: int | None) -> None:
    """In the child: be killed when the comparison's process dies (Linux ``PR_SET_PDEATHSIG``), and stop at once if
    it died already; elsewhere a child may outlive a killed parent (it finishes its backbone)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        sys.exit(1)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _first_error(log_tail: str) -> str:
    for line in reversed(log_tail.splitlines()):
        s = line.strip()
        if s and ("Error" in s or "error" in s or "Killed" in s):
            return s[:300]
    return (log_tail.strip().splitlines() or ["no output"])[-1][:300]


def _run_one(plan: ComparePlan, name: str, device: str, timeout: float) -> dict[str, Any]:
    from .._io import atomic_write

    run_dir = plan.out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "row.json").unlink(missing_ok=True)
    spec = run_dir / "child.json"
    atomic_write(spec, json.dumps({"config": dataclasses.asdict(plan.cfg), "name": name, "run_dir": str(run_dir),
                                   "device": device, "parent_pid": os.getpid()}, indent=1) + "\n")
    log = run_dir / "train.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vertebra.bench.compare", str(spec)], stdout=f,
                                stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"name": name, "status": "error", "error": f"timed out after {timeout / 60:.0f} min (see {log})"}
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    done = run_dir / "row.json"
    if code == 0 and done.is_file():
        row = json.loads(done.read_text(encoding="utf-8"))
        row["seconds"] = time.monotonic() - t0
        return row
    tail = _tail(log)
    why = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
    return {"name": name, "status": "error", "error": f"{_first_error(tail)} ({why}; log {log})"}


def _finished(plan: ComparePlan, name: str) -> dict[str, Any] | None:
    p = plan.out / "runs" / name / "row.json"
    if not p.is_file():
        return None
    try:
        row = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return row if row.get("status") == "ok" else None


def _devices(cfg: CompareConfig) -> list[str]:
    """One slot per CUDA device with ``cuda`` and several devices, else the one device."""
    import torch

    if cfg.device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [cfg.device]


def run_compare(plan: ComparePlan, *, timeout: float | None = None,
                on_start: Callable[[str, int, int, bool], None] | None = None,
                on_row: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Train what is not finished yet (one child process per backbone, one per device at a time), writing the
    results after each; returns the rows in the plan's order (excluded ones with their reason)."""
    from .._io import atomic_write
    from ..registry import backbone_spec
    from .measure import machine_info

    cfg = plan.cfg
    plan.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(cfg.device)
    atomic_write(plan.out / "compare.json", json.dumps({"settings": cfg.key(), "names": plan.names,
                                                        "machine": machine}, indent=1) + "\n")
    if timeout is None:
        timeout = 60 * (3 * (cfg.minutes or 10) + 15)
    rows: dict[str, dict[str, Any]] = {}
    for n, why in plan.excluded.items():
        rows[n] = {"name": n, "status": "excluded", "error": why}
    todo = []
    for n in plan.names:
        if n in rows:
            continue
        old = _finished(plan, n)
        if old is not None:
            rows[n] = old
        else:
            todo.append(n)
    lock = threading.Lock()

    def ordered() -> list[dict[str, Any]]:
        out = []
        for n in plan.names:
            r = dict(rows.get(n) or {"name": n, "status": "pending"})
            r.setdefault("family", backbone_spec(n).family)
            out.append(r)
        return out

    def publish() -> None:
        write_compare_report(plan.out, ordered(), machine, cfg)

    with lock:
        publish()
    for i, n in enumerate(plan.names):
        if n in rows and rows[n].get("status") == "ok" and on_start is not None:
            on_start(n, i, len(plan.names), True)
    slots: queue.Queue[str] = queue.Queue()
    for d in _devices(cfg):
        slots.put(d)
    errors: list[BaseException] = []

    def work(n: str) -> None:
        device = slots.get()
        try:
            if on_start is not None:
                on_start(n, plan.names.index(n), len(plan.names), False)
            row = _run_one(plan, n, device, timeout)
            with lock:
                rows[n] = row
                publish()
            if on_row is not None:
                on_row(dict(row, family=backbone_spec(n).family))
        except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
            errors.append(e)
        finally:
            slots.put(device)

    n_slots = slots.qsize()
    if n_slots == 1:
        for n in todo:
            work(n)
            if errors:
                raise errors[0]
    else:
        threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in todo]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    return ordered()


# --------------------------------------------------------------------------------------------- results


def pareto_front(rows: list[dict[str, Any]], x: str = "latency_ms", y: str = "AP50") -> list[str]:
    """The names no other row beats on both: lower ``x`` and higher ``y`` (sorted by ``x``)."""
    pts = sorted((_num(r.get(x)), -(_num(r.get(y)) or 0.0), r["name"]) for r in rows
                 if r.get("status") == "ok" and _num(r.get(x)) is not None and _num(r.get(y)) is not None)
    front, best = [], -math.inf
    for _, neg_y, name in pts:
        if -neg_y > best:
            front.append(name)
            best = -neg_y
    return front


def kendall_tau(a: dict[str, float], b: dict[str, float]) -> tuple[float, list[tuple[str, str]]]:
    """Kendall's tau-b between two scorings of the same names, and the pairs the two order differently."""
    names = sorted(set(a) & set(b))
    conc = disc = ties_a = ties_b = 0
    swaps = []
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            da, db = a[p] - a[q], b[p] - b[q]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
                swaps.append((p, q))
    denom = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return ((conc - disc) / denom if denom else float("nan")), swaps


_COLUMNS = [("name", "backbone"), ("family", "family"), ("status", "status"), ("AP", "AP"), ("AP50", "AP50"),
            ("AP75", "AP75"), ("APs", "APs"), ("APm", "APm"), ("APl", "APl"), ("params_m", "params (M)"),
            ("gmacs", "GMACs"), ("latency_ms", "latency b1 (ms)"), ("train_ips", "train img/s"),
            ("steps", "steps"), ("train_minutes", "train min"), ("error", "note")]


def compare_table_rows(rows: list[dict[str, Any]], brief: bool = False) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells (the HTML one; ``brief``: the console's, without steps, minutes and notes),
    best AP50 first."""
    def cell(k, v) -> str:
        f = _num(v)
        if f is None:
            return "" if v is None else str(v)
        if k in METRICS:
            return "n/a" if f < 0 else f"{f:.3f}"  # -1: the validation set has no object of that size
        if k == "steps":
            return str(int(f))
        return f"{f:.2f}" if abs(f) < 100 else f"{f:.0f}"

    cols = [(k, t) for k, t in _COLUMNS if not brief or k not in ("steps", "train_minutes", "error", "APl")]
    order = sorted(rows, key=lambda r: (r.get("status") != "ok", -(_num(r.get("AP50")) or 0.0)))
    return [t for _, t in cols], [[cell(k, r.get(k)) for k, _ in cols] for r in order]


def _plots(rows: list[dict[str, Any]], cfg: CompareConfig) -> dict[str, bytes]:
    from .report import _figure, _png

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return {}
    plt = _figure()
    plots = {}
    front = set(pareto_front(ok))
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in ok:
        on = r["name"] in front
        ax.scatter(r["latency_ms"], r["AP50"], s=40 + 3 * (_num(r.get("params_m")) or 1), alpha=0.8,
                   color="tab:red" if on else "tab:blue", edgecolors="black", linewidths=0.5)
        ax.annotate(r["name"], (r["latency_ms"], r["AP50"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    fp = sorted((r for r in ok if r["name"] in front), key=lambda r: r["latency_ms"])
    if fp:
        ax.step([r["latency_ms"] for r in fp], [r["AP50"] for r in fp], where="post", color="tab:red", lw=1.2,
                label="Pareto front (nothing is both faster and better)")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel(f"detector latency, batch 1, {cfg.size} x {cfg.size} px (ms, log scale)")
    ax.set_ylabel("COCO AP50 (val)")
    ax.set_title(f"AP50 against latency after {cfg.budget()} each (marker area ~ parameters)")
    ax.grid(True, which="both", alpha=0.3)
    plots["ap50_vs_latency"] = _png(fig)

    fig, ax = plt.subplots(figsize=(9, 6))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(ok):
        pts = [tuple(p) for p in r.get("curve") or []]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=cmap(i % 20), label=r["name"])
    ax.set_xlabel("training minutes")
    ax.set_ylabel("COCO AP50 (val)")
    ax.set_title(f"AP50 during training ({cfg.preset} preset, seed {cfg.seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    plots["ap50_vs_minutes"] = _png(fig)

    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(ok) + 2), 5))
    order = sorted(ok, key=lambda r: -(_num(r.get("AP")) or 0.0))
    width = 0.27
    for j, (k, color) in enumerate((("APs", "tab:blue"), ("APm", "tab:orange"), ("APl", "tab:green"))):
        ax.bar([i + (j - 1) * width for i in range(len(order))], [max(0.0, _num(r.get(k)) or 0.0) for r in order],
               width, color=color, label=k)  # -1 (no object of that size) drawn as no bar
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([r["name"] for r in order], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("COCO AP (val)")
    ax.set_title("AP by object size (small < 32², medium < 96², large, in the image's pixels)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    plots["ap_by_size"] = _png(fig)
    return plots


def write_compare_report(out: Path, rows: list[dict[str, Any]], machine: dict, cfg: CompareConfig) -> Path:
    """``results.csv``, ``results.json``, the plots (PNG) and a self-contained ``report.html`` in ``out``."""
    import base64
    import csv
    import io

    from .._io import atomic_write

    keys = [k for k, _ in _COLUMNS if k != "error"] + ["wall_minutes", "preset", "init", "anchors", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in keys})
    atomic_write(out / "results.csv", buf.getvalue())
    settings = {"budget": cfg.budget(), **dataclasses.asdict(cfg)}
    atomic_write(out / "results.json", json.dumps({"settings": settings, "machine": machine, "rows": rows,
                                                   "pareto_front": pareto_front(rows)}, indent=1, default=str) + "\n")
    plots = _plots(rows, cfg)
    for k, png in plots.items():
        atomic_write(out / f"{k}.png", png)
    head, cells = compare_table_rows(rows)
    css = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}"
           "th{background:#f0f0f0}img{max-width:100%}tr.bad td{background:#fde8e8}")
    data = cfg.source.get("data") or cfg.source.get("coco_ann") or cfg.source.get("voc") or "the built-in shapes set"
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>vertebra compare</title><style>{css}</style>"
            "</head><body><h1>vertebra compare: backbones as RetinaNet detectors</h1>",
            f"<p>Each backbone trained for <b>{html.escape(cfg.budget())}</b> on {html.escape(str(data))} at "
            f"{cfg.size} px, the <b>{html.escape(cfg.preset)}</b> preset, seed {cfg.seed}, batch {cfg.batch}; "
            f"evaluated on {'the first ' + str(cfg.val_limit) if cfg.val_limit else 'all'} validation images. "
            "Latency: the trained detector end to end (preprocessing, network, postprocessing), batch 1, "
            "optimize_for_inference.</p>", "<h2>Machine</h2><table>"]
    for k, v in machine.items():
        page.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>")
    page.append("</table><h2>Results (best AP50 first)</h2><table><tr>"
                + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
    status_col = head.index("status")
    for c in cells:
        bad = " class='bad'" if c[status_col] not in ("ok",) else ""
        page.append(f"<tr{bad}>" + "".join(f"<td>{html.escape(v)}</td>" for v in c) + "</tr>")
    page.append("</table>")
    front = pareto_front(rows)
    if front:
        page.append(f"<p>Pareto front (AP50 against latency): {html.escape(', '.join(front))}.</p>")
    titles = {"ap50_vs_latency": "AP50 against detector latency", "ap50_vs_minutes": "AP50 against training minutes",
              "ap_by_size": "AP by object size"}
    for k, png in plots.items():
        page.append(f"<h2>{titles[k]}</h2><img alt='{k}' src='data:image/png;base64,"
                    f"{base64.b64encode(png).decode()}'>")
    page.append("<p>Files: results.csv, results.json, the PNG plots and runs/&lt;backbone&gt;/ (train.log, "
                "config.json, metrics.csv, checkpoints) beside this page.</p></body></html>")
    path = out / "report.html"
    atomic_write(path, "\n".join(page))
    return path


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
