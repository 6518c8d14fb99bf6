"""What must not depend on the machine: bench's memory probe on Linux / macOS / Windows, bench's default device,
``bench --task det --compile`` really compiling what it times, and the export sidecar's normalisation of a
CIFAR-style classifier checkpoint."""

from __future__ import annotations

import sys
import types
from dataclasses import asdict

import pytest
import torch
from torch import nn

import vertebra
from vertebra.bench import measure, runner
from vertebra.bench.measure import BenchConfig, bench_device, measure_detector
from vertebra.bench.report import bench_table, render_html, rows_to_csv

# -- the memory probe ------------------------------------------------------------------------------------------


def _fake_resource(ru_maxrss: int) -> types.ModuleType:
    mod = types.ModuleType("resource")
    mod.RUSAGE_SELF = 0
    mod.getrusage = lambda who: types.SimpleNamespace(ru_maxrss=ru_maxrss)
    return mod


def _no_proc(monkeypatch) -> None:
    def no_file(*args, **kwargs):
        raise FileNotFoundError("/proc/self/statm")

    monkeypatch.setattr(measure, "open", no_file, raising=False)  # the module's name wins over the builtin


@pytest.mark.parametrize("platform, ru_maxrss", [("linux", 300 * 1024), ("darwin", 300 * 2**20)])
def test_ru_maxrss_units(monkeypatch, platform, ru_maxrss):
    """ru_maxrss is in kibibytes on Linux and in bytes on macOS: both are 300 MiB here."""
    monkeypatch.setitem(sys.modules, "resource", _fake_resource(ru_maxrss))
    monkeypatch.setattr(sys, "platform", platform)
    assert measure.peak_rss_mb() == pytest.approx(300.0)


def test_macos_baseline_is_the_peak_before_measuring(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", _fake_resource(120 * 2**20))
    monkeypatch.setattr(sys, "platform", "darwin")
    _no_proc(monkeypatch)
    assert measure.current_rss_mb() is None
    base = runner.memory_baseline()
    assert base == pytest.approx(120.0)
    monkeypatch.setitem(sys.modules, "resource", _fake_resource(200 * 2**20))
    assert runner.memory_fields(base) == pytest.approx({"peak_mem_mb": 200.0, "model_mem_mb": 80.0})


def test_linux_probe_reads_this_process():
    if not sys.platform.startswith("linux"):
        pytest.skip("the /proc probe is Linux's")
    now, peak = measure.current_rss_mb(), measure.peak_rss_mb()
    assert 10 < now <= peak * 1.05 < 1e6, (now, peak)


def test_a_row_without_a_memory_probe_is_measured_with_memory_none(monkeypatch):
    """Windows: no ``resource`` module, no /proc. The row succeeds, its memory fields are None, shown n/a."""
    # sys.platform stays: torch caches what it reads from it (inductor would look for MSVC's cl from then on)
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource -> ImportError
    _no_proc(monkeypatch)
    assert measure.current_rss_mb() is None and measure.peak_rss_mb() is None
    cfg = BenchConfig(device="cpu", batch=2, runs=1, warmup=0, min_seconds=0.0, train=False)

    class Queue(list):
        put = list.append

    out = Queue()
    runner._child("lenet5", "vertebra", {**asdict(cfg), "_threads": torch.get_num_threads()}, out)
    assert out[0][0] == "ok", out[0][1]
    payload = out[0][1]
    assert payload["peak_mem_mb"] is None and payload["model_mem_mb"] is None and payload["throughput_ips"] > 0
    row = runner.base_row("lenet5", "vertebra", cfg, {"cpu": "x"})
    row.update(payload, status="ok")
    assert ",," in rows_to_csv([row]).splitlines()[1]  # an empty cell, not "None"
    assert "n/a" in render_html([row], {}, {}, {}, [])
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(bench_table([row], "t"))
    assert "n/a" in console.export_text() and "None" not in console.export_text()


def test_runner_imports_without_resource(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "resource", None)
    importlib.reload(runner)  # `import resource` at the top would fail here (Windows)
    importlib.reload(runner)


# -- the default device ----------------------------------------------------------------------------------------


def test_bench_defaults_to_cuda_when_present(monkeypatch):
    from vertebra.devices import default_device

    assert BenchConfig().device == default_device() == bench_device(None)
    assert BenchConfig(device="cpu").device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert BenchConfig().device == "cuda" and bench_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert BenchConfig().device == "cpu"


# -- bench --task det --compile --------------------------------------------------------------------------------

DET = dict(task="det", det_size=64, batch=1, runs=1, warmup=0, min_seconds=0.0, train=False, device="cpu")


def test_det_compile_times_the_compiled_network(monkeypatch):
    """torch.compile replaced by a recorder: the backbone + FPN and the heads are what gets compiled, and the
    timed calls run the compiled callables (postprocessing stays eager and is still timed)."""
    compiled: list[str] = []
    calls: list[str] = []

    class Recorded(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(type(self.inner).__name__)
            return self.inner(*args, **kwargs)

    def fake_compile(target, **kwargs):
        compiled.append(type(target).__name__ if isinstance(target, nn.Module) else target.__qualname__)
        if isinstance(target, nn.Module):
            return Recorded(target)

        def run(*args, **kw):
            calls.append(target.__qualname__)
            return target(*args, **kw)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    row = measure_detector("resnet18", BenchConfig(**DET, compile=True), num_classes=3)
    assert compiled == ["RetinaNetCore.pyramid", "RetinaNetHead"]
    assert row["compile"] is True and row["postprocess_ms"] > 0
    # warm-up (at least one call with compile) + the timed latency and throughput calls all ran compiled code
    assert calls.count("RetinaNetCore.pyramid") == calls.count("RetinaNetHead") >= 3
    compiled.clear()
    calls.clear()
    row = measure_detector("resnet18", BenchConfig(**DET, compile=False), num_classes=3)
    assert compiled == [] and calls == [] and row["compile"] is False


def test_det_compile_row_is_never_labelled_compiled_when_nothing_compiled_ran(monkeypatch):
    monkeypatch.setattr(measure, "compile_detector_network", lambda model: (lambda: 0))
    with pytest.raises(RuntimeError, match="compiled network never ran"):
        measure_detector("resnet18", BenchConfig(**DET, compile=True), num_classes=3)


@pytest.mark.slow
def test_det_compile_really_compiles():
    """The real torch.compile (inductor, C++ on CPU): about 20-40 s here on 2 cores with a cold cache."""
    measure.check_compile("cpu")
    row = measure_detector("resnet18", BenchConfig(**DET, compile=True), num_classes=3)
    assert row["compile"] is True and row["latency_ms"] > 0 and row["postprocess_ms"] > 0


def test_compile_without_a_cpp_compiler_is_refused(monkeypatch):
    if sys.platform.startswith("win"):
        pytest.skip("on Windows the check leaves the compiler to torch")
    monkeypatch.setattr(measure.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="no compiler was found"):
        measure.check_config(BenchConfig(device="cpu", compile=True))
    measure.check_config(BenchConfig(device="cpu", compile=False))


# -- export: a CIFAR classifier's normalisation ----------------------------------------------------------------


def _checkpoint(tmp_path, spec: dict, model) -> str:
    """As tests/test_export.py writes a training checkpoint (nothing trained)."""
    from vertebra.engine.checkpoint import save_checkpoint

    path = tmp_path / "ckpt" / "last.safetensors"
    save_checkpoint(path, {"model": model.state_dict()}, {"model": spec, "epoch": 1})
    return str(path)


@pytest.mark.parametrize("recorded", [True, False], ids=["spec-records-it", "older-spec-without-it"])
def test_export_info_has_the_training_normalisation_of_a_cifar_classifier(tmp_path, recorded):
    from vertebra.engine.tasks import ClassificationTask
    from vertebra.export import load_for_export
    from vertebra.registry import IMAGENET_MEAN, backbone_spec

    mean, std = ClassificationTask.normalization("resnet110_sd")  # what training normalises resnet110_sd's inputs with
    assert mean == list(backbone_spec("resnet110_sd").mean) and tuple(mean) != tuple(IMAGENET_MEAN)
    spec = {"task": "cls", "backbone": "resnet110_sd", "num_classes": 10, "categories": [str(i) for i in range(10)],
            "size": 32}
    if recorded:
        spec.update(mean=mean, std=std)
    model = vertebra.create_backbone("resnet110_sd", num_classes=10)
    _, info = load_for_export(_checkpoint(tmp_path, spec, model))
    assert info["mean"] == pytest.approx(mean) and info["std"] == pytest.approx(std)
    assert info["categories"] == spec["categories"]


# -- the CPU allocator setting ---------------------------------------------------------------------------------


def test_keep_freed_memory_in_a_fresh_process():
    """On Linux with glibc the setting takes (and a second call changes nothing); elsewhere it says False. Run in a
    child process: the setting is the process's."""
    import subprocess

    code = ("import sys; from vertebra.devices import keep_freed_memory as k; a = k(); b = k(); "
            "import torch; x = torch.ones(1 << 20); del x; y = torch.zeros(1 << 20); print(a); "
            "sys.exit(0 if a == b and float(y.sum()) == 0 else 1)")
    probe = "import ctypes.util, sys; print(sys.platform.startswith('linux') and bool(ctypes.util.find_library('c')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    glibc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"
    if glibc and sys.platform.startswith("linux"):
        assert out.stdout.strip() == "True"


def test_keep_freed_memory_without_mallopt(monkeypatch):
    """A libc without mallopt (musl): False, no error."""
    import ctypes

    from vertebra import devices

    monkeypatch.setattr(devices, "_kept", None)
    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: types.SimpleNamespace())
    assert devices.keep_freed_memory() is False
    monkeypatch.setattr(devices, "_kept", None)
    monkeypatch.setattr(devices.sys, "platform", "darwin")
    assert devices.keep_freed_memory() is False
