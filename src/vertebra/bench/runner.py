"""``vertebra bench``: measure many networks, each in a child process of its own.

A child process per (network, library) keeps one model's memory out of the next one's
figures (the CPU peak is the child's peak resident memory) and keeps a network that crashes
or runs out of memory from ending the run: its row says what went wrong and the run goes on.

The CPU memory probe (:func:`memory_fields`) reads ``getrusage``'s peak (kibibytes on Linux, bytes on macOS)
and, on Linux, the resident memory before measuring from ``/proc``; elsewhere the peak before measuring is the
baseline, and where there is no probe at all (Windows) the memory fields are None ("n/a") and the row is
measured all the same.

:func:`plan_bench` checks the request and lists the jobs, :func:`run_bench` measures them.
What is measured follows ``BenchConfig.task``: one :class:`BenchMode` per task (``MODES``),
the only place that tells the classification benchmark from the detection one.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .measure import BenchConfig
from .report import ROW_COLUMNS, add_peer_ratios

__all__ = ["HEADLINE", "ROW_COLUMNS", "MODES", "BenchMode", "BenchPlan", "BenchRun", "plan_bench", "run_bench",
           "run_isolated", "headline_names", "peers_of", "base_row", "default_out_dir", "memory_baseline",
           "memory_fields"]

# one headline variant of each network of the survey, at its paper's input size
HEADLINE = [
    "lenet5", "alexnet", "zfnet", "vgg16", "googlenet", "resnet50", "preact_resnet50", "inception_v2",
    "inception_v3", "inception_v4", "inception_resnet_v2", "resnet110_sd", "wide_resnet50_2", "squeezenet1_0",
    "xception", "mobilenet_v1", "resnext50_32x4d", "polynet", "pyramidnet110_a48", "attention56", "densenet121",
    "dpn68", "se_resnet50", "shufflenet_g3", "condensenet74_c4_g4", "mobilenet_v2", "shufflenet_v2_x1_0",
    "nasnet_a_mobile", "amoebanet_a_mobile", "pnasnet5_mobile", "mnasnet_a1",
]


def headline_names() -> list[str]:
    from ..registry import list_backbones

    registered = set(list_backbones())
    return [n for n in HEADLINE if n in registered]


def peers_of(name: str) -> list[str]:
    """The torchvision/timm builds of the same network: the spec's twin, and timm's model of the
    same name where the twin is torchvision's."""
    from ..reference.twins import has_timm
    from ..registry import backbone_spec

    spec = backbone_spec(name)
    if not spec.reference:
        return []
    peers = [spec.reference]
    if spec.reference_source == "torchvision" and has_timm():
        import timm

        if timm.is_model(spec.reference_name):
            peers.append(f"timm:{spec.reference_name}")
    return peers


def memory_baseline() -> float | None:
    """This process's memory before it builds a model (MiB): the resident memory where it can be read (Linux),
    else the peak so far (macOS); None without a probe (Windows)."""
    from .measure import current_rss_mb, peak_rss_mb

    now = current_rss_mb()
    return now if now is not None else peak_rss_mb()


def memory_fields(base: float | None) -> dict:
    """``peak_mem_mb`` (this process's peak resident memory) and ``model_mem_mb`` (the peak over ``base``), in MiB;
    None for what this platform cannot tell."""
    from .measure import peak_rss_mb

    peak = peak_rss_mb()
    return {"peak_mem_mb": peak, "model_mem_mb": peak - base if peak is not None and base is not None else None}


def _input_size(name: str, cfg: BenchConfig) -> tuple[int, int, int]:
    from ..registry import backbone_spec

    spec = backbone_spec(name)
    return tuple(spec.input_size) if cfg.input is None else (spec.input_size[0], cfg.input, cfg.input)


class BenchMode:
    """What one ``BenchConfig.task`` measures. Subclasses: :class:`ClassificationBench`, :class:`DetectionBench`."""

    #: whether --compare (the torchvision/timm twins) applies
    compares: bool = True

    def check(self, name: str, cfg: BenchConfig) -> None:
        """Raise ValueError, before anything runs, on a network this mode cannot measure as configured."""

    def input_label(self, name: str, cfg: BenchConfig) -> str:
        raise NotImplementedError

    def measure(self, name: str, library: str, cfg: BenchConfig) -> dict:
        """The row's measured fields (runs in the child process)."""
        raise NotImplementedError


class ClassificationBench(BenchMode):
    """The backbone as a classifier at its paper's input (or ``cfg.input``); peers are its twins."""

    def check(self, name: str, cfg: BenchConfig) -> None:
        if cfg.input is None:
            return
        import torch

        from ..registry import create_backbone

        with torch.device("meta"):
            model = create_backbone(name)
        if cfg.input < model.min_input_size:
            raise ValueError(f"--input {cfg.input} is below the minimum input of {name} "
                             f"({model.min_input_size}x{model.min_input_size}); choose a larger --input")

    def input_label(self, name: str, cfg: BenchConfig) -> str:
        return "x".join(map(str, _input_size(name, cfg)[1:]))

    def measure(self, name: str, library: str, cfg: BenchConfig) -> dict:
        import torch

        from ..reference.twins import build_twin
        from ..registry import backbone_spec, create_backbone
        from .measure import measure_model

        size = _input_size(name, cfg)
        if library == "vertebra":
            # fail early with the network's own message on an input below its minimum
            with torch.device("meta"):
                create_backbone(name).check_input(torch.empty(1, *size))

            def build():
                return create_backbone(name)
        else:
            num_classes = backbone_spec(name).num_classes

            def build():
                return build_twin(library, num_classes=num_classes)
        return measure_model(build, size, cfg, optimize=library == "vertebra" and not cfg.eager)


class DetectionBench(BenchMode):
    """The backbone inside vertebra's RetinaNet at ``cfg.det_size``; no peers."""

    compares = False

    def input_label(self, name: str, cfg: BenchConfig) -> str:
        return f"{cfg.det_size}x{cfg.det_size}"

    def measure(self, name: str, library: str, cfg: BenchConfig) -> dict:
        from .measure import measure_detector

        if library != "vertebra":
            raise ValueError("detection mode measures vertebra's RetinaNet only")
        return measure_detector(name, cfg)


#: ``BenchConfig.task`` -> what it measures
MODES: dict[str, BenchMode] = {"cls": ClassificationBench(), "det": DetectionBench()}


def _mode(cfg: BenchConfig) -> BenchMode:
    try:
        return MODES[cfg.task]
    except KeyError:
        raise ValueError(f"--task must be one of {', '.join(MODES)}, got {cfg.task!r}") from None


def _measure_one(name: str, library: str, cfg_dict: dict) -> dict:
    """Runs inside the child process."""
    import torch

    cfg = BenchConfig(**cfg_dict)
    torch.manual_seed(0)
    return _mode(cfg).measure(name, library, cfg)


def _child(name: str, library: str, cfg_dict: dict, out: mp.Queue) -> None:
    try:
        import torch

        torch.set_num_threads(cfg_dict.pop("_threads", torch.get_num_threads()))
        base = memory_baseline()
        row = _measure_one(name, library, cfg_dict)
        if cfg_dict.get("device") in (None, "cpu"):
            row.update(memory_fields(base))
        out.put(("ok", row))
    except BaseException as exc:  # reported in the row; the parent goes on
        out.put(("error", f"{type(exc).__name__}: {exc}".strip()[:500] + "\n" + traceback.format_exc()[-1500:]))


def run_isolated(name: str, library: str, cfg: BenchConfig, timeout: float = 900.0,
                 threads: int | None = None) -> tuple[str, dict | str]:
    """Measure one network in a fresh process; ("ok", row) or ("error", message)."""
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    cfg_dict = asdict(cfg)
    if threads:
        cfg_dict["_threads"] = threads
    p = ctx.Process(target=_child, args=(name, library, cfg_dict, q), daemon=True)
    p.start()
    try:
        status, payload = q.get(timeout=timeout)
    except queue_mod.Empty:
        if p.is_alive():
            p.kill()
            p.join(5)
            return "error", f"timed out after {timeout:.0f} s"
        return "error", f"the worker process died (exit code {p.exitcode}; out of memory?)"
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    return status, payload


def base_row(name: str, library: str, cfg: BenchConfig, machine: dict) -> dict:
    """A row with everything known before measuring: the network, the settings and the machine."""
    from ..registry import backbone_spec

    spec = backbone_spec(name)
    row = {c: "" for c in ROW_COLUMNS}
    row.update(
        name=name, library=library, family=spec.family, task=cfg.task, device=cfg.device, dtype=cfg.dtype,
        # compile: what was asked; a measured row says what its measurement compiled (measure_model / _detector)
        layout="channels_last" if cfg.channels_last else "NCHW", compile=cfg.compile,
        inference_path=("optimized" if library == "vertebra" and not cfg.eager else "eager"),
        input=_mode(cfg).input_label(name, cfg), batch=cfg.batch, paper_params_m=spec.paper_params_m,
        paper_gmacs=spec.paper_gmacs, paper_top1_err=spec.paper_top1_err, **machine,
    )
    return row


def default_out_dir() -> Path:
    return Path("reports") / time.strftime("bench-%Y%m%d-%H%M%S")


# -- one run ----------------------------------------------------------------------------------


@dataclass
class BenchPlan:
    """A checked request: the networks, the settings and the (network, library) jobs, in order."""

    names: list[str]
    cfg: BenchConfig
    compare: bool
    jobs: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)  # what the run leaves out, and why


@dataclass
class BenchRun:
    """What :func:`run_bench` measured: the rows (one per job) and what the report says about them."""

    rows: list[dict]
    machine: dict
    config: dict
    notes: list[str]


def plan_bench(names: list[str] | None, cfg: BenchConfig, *, family: str | None = None,
               compare: bool = False) -> BenchPlan:
    """Check everything that can fail before a measurement: the settings, the names (KeyError with the
    closest ones), the inputs. ``names`` None or empty: ``family``'s networks, else the headline set."""
    from ..reference import twins
    from ..registry import backbone_spec, list_backbones
    from .measure import check_config

    check_config(cfg)
    mode = _mode(cfg)
    if names:
        names = list(dict.fromkeys(names))
    elif family:
        names = list_backbones(family)
    else:
        names = headline_names()
    for n in names:
        backbone_spec(n)
        mode.check(n, cfg)
    notes = []
    if compare and not mode.compares:
        raise ValueError(f"--compare measures classification twins; it does not apply to --task {cfg.task}")
    if compare and not twins.has_timm():
        notes.append("timm is not installed: the timm twins are left out of the comparison (pip install timm)")
    jobs = [(n, lib) for n in names for lib in ["vertebra", *(peers_of(n) if compare else [])]]
    return BenchPlan(names, cfg, compare, jobs, notes)


def run_bench(plan: BenchPlan, *, timeout: float = 900.0, threads: int | None = None,
              on_start: Callable[[str, str], None] | None = None,
              on_row: Callable[[dict], None] | None = None) -> BenchRun:
    """Measure the machine's ceiling, then every job of ``plan`` in a process of its own.

    Each row gets its fraction of the ceiling and, with peers, its ratio to the fastest one.
    ``on_start(name, library)`` and ``on_row(row)`` report progress."""
    from .measure import machine_info, peak_gmacs_per_s

    cfg = plan.cfg
    t0 = time.monotonic()
    machine = machine_info(cfg.device)
    peak = peak_gmacs_per_s(cfg.device, cfg.dtype)
    notes = [*plan.notes, f"machine ceiling: {peak:.1f} GMAC/s ({cfg.dtype} large matmul on {cfg.device}, the "
                          "faster of BLAS and oneDNN on CPU, best of 5)"]
    rows: list[dict] = []
    for name, lib in plan.jobs:
        if on_start is not None:
            on_start(name, lib)
        row = base_row(name, lib, cfg, machine)
        status, payload = run_isolated(name, lib, cfg, timeout=timeout, threads=threads)
        if status == "ok":
            row.update(payload, status="ok")
            ach = row.get("achieved_gmacs_per_s")
            row["peak_fraction"] = ach / peak if ach and peak else ""
        else:
            row.update(status="error", error=payload)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    add_peer_ratios(rows)
    config = {"names": " ".join(plan.names), "input": cfg.input or "paper", "batch": cfg.batch,
              "device": cfg.device, "dtype": cfg.dtype, "layout": "channels_last" if cfg.channels_last else "NCHW",
              "compile": cfg.compile, "task": cfg.task, "compare": plan.compare,
              "wall_seconds": round(time.monotonic() - t0, 1)}
    return BenchRun(rows, machine, config, notes)
