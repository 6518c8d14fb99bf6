"""``vertebra bench``: measure many networks, each in a child process of its own.

A child process per (network, library) keeps one model's memory out of the next one's
figures (the CPU peak is the child's peak resident memory) and keeps a network that crashes
or runs out of memory from ending the run: its row says what went wrong and the run goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import resource
import traceback
from dataclasses import asdict
from pathlib import Path

from .measure import BenchConfig

# one headline variant of each network of the survey, at its paper's input size
HEADLINE = [
    "lenet5", "alexnet", "zfnet", "vgg16", "googlenet", "resnet50", "preact_resnet50", "inception_v2",
    "inception_v3", "inception_v4", "inception_resnet_v2", "resnet110_sd", "wide_resnet50_2", "squeezenet1_0",
    "xception", "mobilenet_v1", "resnext50_32x4d", "polynet", "pyramidnet110_a48", "attention56", "densenet121",
    "dpn68", "se_resnet50", "shufflenet_g3", "condensenet74_c4_g4", "mobilenet_v2", "shufflenet_v2_x1_0",
    "nasnet_a_mobile", "amoebanet_a_mobile", "pnasnet5_mobile", "mnasnet_a1",
]

ROW_COLUMNS = [
    "name", "library", "family", "task", "status", "error", "device", "dtype", "layout", "compile",
    "inference_path", "input", "batch", "params_m", "paper_params_m", "gmacs", "paper_gmacs", "paper_top1_err",
    "latency_ms", "latency_p90_ms", "throughput_ips", "train_ips", "postprocess_ms", "peak_mem_mb",
    "model_mem_mb", "achieved_gmacs_per_s", "peak_fraction", "ratio_vs_peer", "peer", "unsupported_ops",
    "cpu", "cores", "threads", "gpu", "torch", "torchvision", "cuda",
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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_one(name: str, library: str, cfg_dict: dict) -> dict:
    """Runs inside the child process."""
    import torch

    from ..reference.twins import build_twin
    from ..registry import backbone_spec, create_backbone
    from .measure import measure_detector, measure_model

    cfg = BenchConfig(**cfg_dict)
    spec = backbone_spec(name)
    size = tuple(spec.input_size) if cfg.input is None else (spec.input_size[0], cfg.input, cfg.input)
    torch.manual_seed(0)
    if cfg.task == "det":
        if library != "vertebra":
            raise ValueError("detection mode measures vertebra's RetinaNet only")
        return measure_detector(name, cfg)
    if library == "vertebra":
        # fail early with the network's own message on an input below its minimum
        with torch.device("meta"):
            create_backbone(name).check_input(torch.empty(1, *size))

        def build():
            return create_backbone(name)
    else:
        def build():
            return build_twin(library, num_classes=spec.num_classes)
    return measure_model(build, size, cfg, optimize=library == "vertebra" and not cfg.eager)


def _child(name: str, library: str, cfg_dict: dict, out: mp.Queue) -> None:
    try:
        import torch

        torch.set_num_threads(cfg_dict.pop("_threads", torch.get_num_threads()))
        base = _rss_mb()
        row = _measure_one(name, library, cfg_dict)
        if cfg_dict.get("device", "cpu") == "cpu":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            row["peak_mem_mb"] = peak
            row["model_mem_mb"] = peak - base
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
    from ..registry import backbone_spec

    spec = backbone_spec(name)
    size = spec.input_size if cfg.input is None else (spec.input_size[0], cfg.input, cfg.input)
    row = {c: "" for c in ROW_COLUMNS}
    row.update(
        name=name, library=library, family=spec.family, task=cfg.task, device=cfg.device, dtype=cfg.dtype,
        layout="channels_last" if cfg.channels_last else "NCHW", compile=cfg.compile,
        inference_path=("optimized" if library == "vertebra" and not cfg.eager else "eager"),
        input=("x".join(map(str, size[1:])) if cfg.task == "cls" else f"{cfg.det_size}x{cfg.det_size}"),
        batch=cfg.batch, paper_params_m=spec.paper_params_m, paper_gmacs=spec.paper_gmacs,
        paper_top1_err=spec.paper_top1_err, **machine,
    )
    return row


def validate_names(names: list[str], cfg: BenchConfig) -> None:
    """Unknown names and inputs below a network's minimum fail before anything runs."""
    import torch

    from ..registry import backbone_spec, create_backbone

    for n in names:
        backbone_spec(n)  # KeyError with the closest names
        if cfg.task == "cls" and cfg.input is not None:
            with torch.device("meta"):
                model = create_backbone(n)
            if cfg.input < model.min_input_size:
                raise ValueError(f"--input {cfg.input} is below the minimum input of {n} "
                                 f"({model.min_input_size}x{model.min_input_size}); choose a larger --input")


def default_out_dir() -> Path:
    import time

    return Path("reports") / time.strftime("bench-%Y%m%d-%H%M%S")
