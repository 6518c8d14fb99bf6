"""Faults injected on purpose: a training run killed with SIGKILL at chosen moments (inside the checkpoint writer,
during evaluation, inside a data-loader worker), the disk filling up while a checkpoint is written, and two runs
started on one run folder.

Each kill lands where it is meant to: the run is a subprocess whose driver (below) patches the moment to write a
marker file and then sleep; the test waits for the marker, kills the process group with SIGKILL and asserts that
the marker is there (and, for the writer, that the half-written temporary file is). Then the run folder's last
checkpoint must load and ``--resume`` must end with exactly the weights of an uninterrupted run of the same seed.
Tiny backbone, 64 px images, 8 steps: a few seconds a test.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vertebra.cli import main
from vertebra.data import write_shapes
from vertebra.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL") or sys.platform == "win32",
                                reason="SIGKILL and fork: POSIX")

DRIVER = textwrap.dedent('''
    """Run `vertebra ARGV` with one moment patched to write MARKER and sleep (until killed)."""
    import os, sys, time
    from pathlib import Path

    mode, marker, run_dir, argv = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]

    def hold():
        marker.write_text(str(os.getpid()))
        time.sleep(600)

    if mode == "checkpoint":  # the third write of last.safetensors: half its bytes in the temporary file, then hold
        import vertebra._io as io_mod
        import vertebra.engine.checkpoint as ck
        calls = []

        def writer(path, data):
            path = Path(path)
            if path.name == "last.safetensors":
                calls.append(path)
                if len(calls) == 3:
                    tmp = path.parent / f".{path.name}.killed.tmp"
                    with open(tmp, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    hold()
            return io_mod.atomic_write(path, data)

        ck.atomic_write = writer
    elif mode == "eval":  # the first evaluation
        import vertebra.engine.train as tr
        real = tr.Trainer.evaluate

        def evaluate(self, *a, **k):
            hold()
            return real(self, *a, **k)

        tr.Trainer.evaluate = evaluate
    elif mode == "loader":  # a data-loader worker, once the run has a checkpoint
        import torch.utils.data
        import vertebra.engine.sampling as sampling
        real = sampling.SeededDataset.__getitem__

        def getitem(self, i):
            if torch.utils.data.get_worker_info() is not None and (run_dir / "last.safetensors").exists():
                hold()
            return real(self, i)

        sampling.SeededDataset.__getitem__ = getitem
    elif mode != "none":
        raise SystemExit(f"unknown mode {mode}")
    from vertebra.cli import main
    raise SystemExit(main(argv))
''')


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "shapes"
    write_shapes(root, num_train=8, num_val=4, size=64, seed=5)
    return root


def train_args(shapes, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(shapes), "--backbone", "shufflenet_v2_x0_5", "--size", "64", "--batch", "2",
            "--epochs", "2", "--optimizer", "adamw", "--lr", "1e-3", "--warmup", "0", "--augment", "flip",
            "--detector-kw", "fpn_channels=16", "--head-convs", "1", "--threads", "1", "--no-progress",
            "--save-every", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory):
    """The final weights of the run every killed-and-resumed run must reproduce (8 steps, 4 per epoch)."""
    out = tmp_path_factory.mktemp("faults") / "whole"
    assert main(train_args(shapes, out)) == 0
    return _weights(out)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(run / "last.safetensors")
    assert ck.state["step"] == 8
    return ck.tensors("model")


def start(mode: str, marker: Path, run: Path, argv: list[str], tmp_path: Path) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(driver), mode, str(marker), str(run), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill_at_marker(proc: subprocess.Popen, marker: Path, timeout: float = 120) -> None:
    """Wait until the run is held at its moment, then SIGKILL it (and its data-loader workers)."""
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before its moment:\n"
                                 f"{proc.stdout.read().decode()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the run never reached its moment")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode, workers, step_at_kill", [
    ("checkpoint", "0", 2),  # inside the third write of last.safetensors: the second is the last whole one
    ("eval", "0", 4),  # the first evaluation (end of epoch 1), after step 4's checkpoint
    ("loader", "2", None),  # a worker fetching a batch once a checkpoint exists (how far the main process got varies)
])
def test_a_killed_run_resumes_to_the_uninterrupted_weights(mode, workers, step_at_kill, shapes, uninterrupted,
                                                           tmp_path):
    run, marker = tmp_path / "run", tmp_path / "held"
    proc = start(mode, marker, run, train_args(shapes, run, "--workers", workers), tmp_path)
    kill_at_marker(proc, marker)
    held_by = int(marker.read_text())
    assert (held_by != proc.pid) if mode == "loader" else (held_by == proc.pid)  # a worker, or the run itself
    if mode == "checkpoint":  # the kill landed inside the writer: its half-written file is there
        assert (run / ".last.safetensors.killed.tmp").stat().st_size > 0
    ck = load_checkpoint(run / "last.safetensors")  # the last checkpoint is whole
    if step_at_kill is not None:
        assert ck.state["step"] == step_at_kill
    assert 1 <= ck.state["step"] < 8
    # the dead run left its lock behind as a file, not as a lock: the resume takes it
    assert main(train_args(shapes, run, "--workers", workers, "--resume")) == 0
    assert not list(run.glob(".*.tmp"))  # the killed write's leftovers are cleaned
    _assert_same(_weights(run), uninterrupted)


def test_disk_full_while_writing_a_checkpoint(shapes, tmp_path, monkeypatch, capsys):
    """ENOSPC inside the writer (half the bytes written, then the error): the previous checkpoint stays whole, the
    temporary file is removed and the run ends with one clear line."""
    import vertebra._io as io_mod
    import vertebra.engine.checkpoint as ck_mod

    armed, calls = [False], []
    real_write, real_fdopen = ck_mod.atomic_write, io_mod.os.fdopen

    def writer(path, data):
        if Path(path).name == "last.safetensors":
            calls.append(path)
            armed[0] = len(calls) == 3
        try:
            return real_write(path, data)
        finally:
            armed[0] = False

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        return FullDisk(f) if armed[0] else f

    monkeypatch.setattr(ck_mod, "atomic_write", writer)
    monkeypatch.setattr(io_mod.os, "fdopen", fdopen)
    run = tmp_path / "run"
    assert main(train_args(shapes, run)) == 2
    err = capsys.readouterr().err
    assert len(calls) == 3
    line = " ".join(err.split())
    assert "last.safetensors: cannot write the checkpoint of step 3, the disk is full" in line, err
    assert "is the previous one, whole" in line and "--resume" in line
    assert load_checkpoint(run / "last.safetensors").state["step"] == 2
    assert not list(run.glob(".*.tmp"))


def test_a_second_run_on_a_busy_folder_refuses(shapes, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "held"
    proc = start("eval", marker, run, train_args(shapes, run), tmp_path)
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() - t0 < 120
            time.sleep(0.05)
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        assert main(train_args(shapes, run)) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"another run is using this folder (pid {proc.pid})" in err and "--out" in err, err
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written by the second
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()


def test_disk_full_while_writing_the_metrics(shapes, tmp_path, monkeypatch, capsys):
    """The same for the other run-folder files (metrics.csv here): one line naming the file and the last checkpoint,
    no traceback."""
    import vertebra._io as io_mod
    import vertebra.engine.records as records

    def full(path, data):
        if Path(path).name == "metrics.csv":
            raise OSError(errno.ENOSPC, f"cannot write {path}: {os.strerror(errno.ENOSPC)}", str(path))
        return io_mod.atomic_write(path, data)

    monkeypatch.setattr(records, "atomic_write", full)
    run = tmp_path / "run"
    assert main(train_args(shapes, run)) == 2
    line = " ".join(capsys.readouterr().err.split())
    assert "metrics.csv" in line and "No space left on device" in line and "Traceback" not in line, line
    assert f"the last complete checkpoint is {run / 'last.safetensors'}" in line
    assert load_checkpoint(run / "last.safetensors").state["step"] == 4
