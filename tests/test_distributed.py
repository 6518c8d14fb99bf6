"""Training on several processes: torchrun + DDP with gloo on CPU, 2 processes on 127.0.0.1, tiny data sets.

Each launch runs ``python -m torch.distributed.run --nproc_per_node 2 ...`` with one torch thread per process.
Equality with one process is up to float32 summation order (a gradient averaged over two halves of the batch
instead of one mean over the batch; BatchNorm statistics summed over two processes): see ``RTOL`` / ``ATOL``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vertebra.data import CocoDetection, ImageFolder, collate_classification, collate_detection, write_shapes
from vertebra.data.transforms import classification_transforms, detection_transforms
from vertebra.engine.checkpoint import load_checkpoint
from vertebra.engine.config import DataSource, TrainConfig
from vertebra.engine.distributed import init_distributed
from vertebra.engine.evaluate import evaluate_classifier, evaluate_detector
from vertebra.engine.models import load_model
from vertebra.engine.train import EpochSampler, Trainer

WORKER = Path(__file__).with_name("distributed_worker.py")
# 2-process vs 1-process training with the same global batch may differ by float32 round-off of reordered sums
# only: |a - b| <= ATOL + RTOL |b| per entry (parameters and BatchNorm running statistics). Measured after 3 SGD
# steps at lr 0.003: <= 3e-7 on the weights, 7e-6 on running variances of ~1 (LeNet-5, 6 steps at lr 0.01:
# 4e-8); a real mismatch (BatchNorm over each process's half batch, a wrong sample order, an unscaled
# accumulated gradient) gives >= 1e-2. The small learning rates matter: at lr 0.05 these tiny nets amplify
# round-off to 1e-4..2e-3 within 3-6 steps (1 vs 2 threads in one process already differ that much).
RTOL, ATOL = 1e-4, 1e-5
LAUNCH_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTEST_XDIST_WORKER"):
        env.pop(k, None)
    return env


def _launcher(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port())]


def torchrun(args: list[str], nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([*_launcher(nproc), *args], env=_env(), capture_output=True, text=True,
                       timeout=LAUNCH_TIMEOUT)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def train_cli(*args: str) -> list[str]:
    return ["-m", "vertebra", "train", "--no-progress", "--threads", "1", "--device", "cpu", *args]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 colour classes, 8 training and 4 validation images each, 32 px."""
    from PIL import Image

    root = tmp_path_factory.mktemp("dist") / "folder"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for cls, col in (("blue", (30, 30, 220)), ("green", (30, 200, 30)), ("red", (220, 30, 30))):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(col) + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def cls_config(folder, out, **kw) -> TrainConfig:
    base = dict(task="cls", source=DataSource(folder=str(folder)), backbone="resnet18", size=32, batch=4, epochs=1,
                optimizer="sgd", lr=0.05, warmup_steps=0, out=str(out), progress=False, log_every=1, threads=1,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def assert_same_weights(a: dict, b: dict) -> None:
    """Equal up to round-off (see RTOL / ATOL)."""
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k].to(a[k].dtype), rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


def assert_moved(init: dict, trained: dict) -> None:
    assert _max_param_diff(init, trained) > 10 * (ATOL + RTOL)  # the comparison is not vacuous


def _eval_cls(run: Path, folder: Path, batch: int = 5) -> dict:
    model, state = load_model(run / "last.safetensors", ema=False)
    spec = state["model"]
    ds = ImageFolder(folder / "val", classification_transforms(False, 32, mean=spec["mean"], std=spec["std"]),
                     classes=spec["categories"])
    return evaluate_classifier(model, DataLoader(ds, batch_size=batch, collate_fn=collate_classification))


# --------------------------------------------------------------------------------------------- no launch


def test_rank_shards_make_the_same_global_batches():
    # consecutive per-rank batches of b, side by side, are the 1-process batches of b x W: the set of samples
    # (and their augmentation seeds) of an optimizer step does not depend on the number of processes
    n, b = 23, 3
    for w in (2, 3):
        g = b * w
        one = list(EpochSampler(n, seed=5, num_samples=(n // g) * g))
        ranks = [list(EpochSampler(n, seed=5, rank=r, world_size=w, num_samples=(n // g) * g)) for r in range(w)]
        assert len({len(r) for r in ranks}) == 1  # the same number of batches on every rank
        for step in range(n // g):
            mine = sorted(x for r in ranks for x in r[step * b:(step + 1) * b])
            assert mine == sorted(one[step * g:(step + 1) * g])
        # resuming at step 1: each rank skips its share of one global batch
        s = EpochSampler(n, seed=5, rank=1, world_size=w, num_samples=(n // g) * g)
        s.set_epoch(0, start=g // w)
        assert list(s) == ranks[1][b:]


def test_setup_errors_are_clear(folder, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--sync-bn needs several processes"):
        Trainer(cls_config(folder, tmp_path / "a", sync_bn=True))
    with pytest.raises(ValueError, match="fewer than one optimizer step's 48"):
        Trainer(cls_config(folder, tmp_path / "b", batch=24, accum_steps=2))
    with pytest.raises(ValueError, match="needs several processes"):
        init_distributed("cpu", "nccl")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set: launch with torchrun"):
        init_distributed("cpu")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="nccl backend needs CUDA"):
        init_distributed("cpu", "nccl")


def test_accumulation_equals_the_big_batch(folder, tmp_path):
    # LeNet-5 has no BatchNorm, so 2 micro-batches of 4 accumulated are one batch of 8, up to round-off
    kw = dict(backbone="lenet5", backbone_kwargs={"in_chans": 3}, max_steps=3, eval_every=100, lr=0.01)
    a = Trainer(cls_config(folder, tmp_path / "a", batch=8, **kw))
    a.fit()
    b = Trainer(cls_config(folder, tmp_path / "b", batch=4, accum_steps=2, **kw))
    b.fit()
    assert b.plan.global_batch == 8 and b.steps_per_epoch == a.steps_per_epoch == 3
    assert_same_weights(b.model.state_dict(), a.model.state_dict())
    assert_moved(Trainer(cls_config(folder, tmp_path / "c", **kw)).model.state_dict(), a.model.state_dict())


def test_linear_lr_scaling_is_stated(folder, tmp_path):
    t = Trainer(cls_config(folder, tmp_path / "lr", batch=4, accum_steps=3, lr=0.1, lr_scale="linear"))
    cfg = json.loads((tmp_path / "lr" / "config.json").read_text())
    assert (cfg["global_batch"], cfg["world_size"], cfg["lr_ref_batch"]) == (12, 1, 4)
    assert cfg["scaled_lr"] == pytest.approx(0.3)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.3)


# --------------------------------------------------------------------------------------------- 2 processes


def test_two_processes_equal_one_process_with_sync_bn(folder, tmp_path):
    # ResNet-18 with BatchNorm: 2 processes x batch 4 with SyncBatchNorm against 1 process x batch 8
    cfg = cls_config(folder, tmp_path / "two", sync_bn=True, lr=0.003)  # 24 images / 8 = 3 steps, then eval
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    torchrun([str(WORKER), str(tmp_path / "cfg.json"), str(tmp_path / "result.json")])
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["world_size"] == 2
    assert res["max_diff_per_step"] == [0.0, 0.0, 0.0]  # every rank holds the same weights after every step
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert (saved["world_size"], saved["global_batch"], saved["batch"], saved["sync_bn"]) == (2, 8, 4, True)

    one = Trainer(cls_config(folder, tmp_path / "one", batch=8, lr=0.003))
    init = {k: v.clone() for k, v in one.model.state_dict().items()}
    one.fit()
    two = load_checkpoint(tmp_path / "two" / "last.safetensors")
    assert two.state["step"] == 3 and two.state["samples"] == 24
    assert not any(k.startswith("module.") for k in two.tensors("model"))
    assert_same_weights(two.tensors("model"), one.model.state_dict())
    assert_moved(init, one.model.state_dict())

    # distributed evaluation (each rank 6 of the 12 images, counts summed) = one process over the whole set
    single = _eval_cls(tmp_path / "two", folder)
    for k in ("top1", "top5"):
        assert res["eval"][k] == single[k]
    assert res["eval"]["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_checkpoint_of_two_processes_resumes_in_one(folder, tmp_path):
    # 2 processes stop mid-epoch at step 2 (16 of 24 images); 1 process resumes with the same global batch
    # (batch 4 x accumulation 2) and ends where 1 process x batch 8 ends
    common = ["--folder", str(folder), "--backbone", "lenet5", "--backbone-kw", "in_chans=3", "--size", "32",
              "--optimizer", "sgd", "--lr", "0.01", "--warmup", "0", "--epochs", "2", "--eval-every", "100"]
    torchrun(train_cli(*common, "--batch", "4", "--max-steps", "2", "--out", str(tmp_path / "run")))
    ck = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert (ck.state["step"], ck.state["samples_in_epoch"], ck.state["world_size"]) == (2, 16, 2)

    kw = dict(backbone="lenet5", backbone_kwargs={"in_chans": 3}, epochs=2, eval_every=100, lr=0.01)
    resumed = Trainer(cls_config(folder, tmp_path / "run", max_steps=6, **kw), resume=True)
    assert (resumed.step, resumed.plan.batch, resumed.plan.accum_steps, resumed.plan.global_batch) == (2, 4, 2, 8)
    resumed.fit()
    ref = Trainer(cls_config(folder, tmp_path / "ref", batch=8, max_steps=6, **kw))
    ref.fit()
    assert resumed.step == ref.step == 6
    assert_same_weights(resumed.model.state_dict(), ref.model.state_dict())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_det") / "shapes"
    write_shapes(root, num_train=16, num_val=6, size=96, seed=4)
    return root


def test_detection_trains_and_distributed_eval_equals_one_process(shapes, tmp_path):
    # every image keeps its 40 best boxes (score_thresh 0): AP is small but depends on every image's detections
    run = tmp_path / "det"
    torchrun(train_cli("--data", str(shapes), "--backbone", "shufflenet_v2_x0_5", "--size", "96", "--batch", "4",
                       "--epochs", "1", "--head-convs", "1", "--detector-kw", "fpn_channels=32",
                       "--detector-kw", "score_thresh=0.0", "--detector-kw", "detections_per_img=40",
                       "--optimizer", "adamw", "--lr", "1e-3", "--sync-bn", "--preset", "none", "--out", str(run)))
    ck = load_checkpoint(run / "last.safetensors")  # (no preset: its EMA would be what the ranks evaluate)
    assert ck.state["step"] == 2 and ck.state["world_size"] == 2
    dist_metrics = ck.state["last_eval"]  # evaluated by both ranks (3 images each), gathered on rank 0
    model, state = load_model(run / "last.safetensors", ema=False)
    ds = CocoDetection(shapes / "val", shapes / "annotations" / "instances_val.json", detection_transforms(False, 96))
    single = evaluate_detector(model, DataLoader(ds, batch_size=4, collate_fn=collate_detection), ds)
    metrics = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    assert any(single[k] > 0 for k in metrics), single  # a comparison of zeros would prove nothing
    for k in metrics:
        assert dist_metrics[k] == pytest.approx(single[k], abs=1e-12), (k, dist_metrics, single)


def test_a_failing_rank_stops_the_job_and_leaves_a_whole_checkpoint(folder, tmp_path):
    # corrupt the one image rank 1 loads first in step 2: rank 1 fails, torchrun stops rank 0, and the
    # checkpoint of step 1 (rank 0 finishes writing it before any rank goes on) is whole
    import shutil

    data = tmp_path / "folder"
    shutil.copytree(folder, data)
    ds = ImageFolder(data / "train")
    rank1 = list(EpochSampler(len(ds), seed=0, rank=1, world_size=2, num_samples=len(ds)))
    bad = ds.samples[rank1[4][0]][0]  # rank 1's 5th item: the first of its step-2 batch of 4
    bad.write_bytes(b"not an image")
    run = tmp_path / "run"
    p = torchrun(train_cli("--folder", str(data), "--backbone", "lenet5", "--backbone-kw", "in_chans=3", "--size",
                           "32", "--batch", "4", "--epochs", "1", "--save-every", "1", "--out", str(run),
                           "--dist-timeout", "2"), check=False)
    assert p.returncode != 0
    assert "rank 1 of 2" in p.stderr and bad.name in p.stderr, p.stderr[-3000:]
    ck = load_checkpoint(run / "last.safetensors")
    assert ck.state["step"] == 1
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".*.tmp-*"))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_a_killed_job_resumes_from_its_last_checkpoint(folder, tmp_path):
    # kill -9 of the launcher mid-run: the ranks (torchrun gives each its own session) notice and stop, and
    # the run resumes, here in one process, from the last whole checkpoint
    run = tmp_path / "run"
    cmd = [*_launcher(), *train_cli("--folder", str(folder), "--backbone", "lenet5", "--backbone-kw", "in_chans=3",
                                    "--size", "32", "--batch", "4", "--epochs", "1000", "--eval-every", "1000",
                                    "--save-every", "1", "--out", str(run))]
    job = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while time.monotonic() < deadline and job.poll() is None:
            try:
                if json.loads((run / "last.json").read_text())["step"] >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        assert job.poll() is None, job.stderr.read()[-3000:]
        workers = _children(job.pid)
        assert len(workers) == 2
        job.kill()
        job.wait(30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "the ranks outlived their launcher"
    finally:
        for pid in [job.pid, *workers]:  # whatever is left of this test's own job
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    ck = load_checkpoint(run / "last.safetensors")
    step = ck.state["step"]
    assert step >= 3
    kw = dict(backbone="lenet5", backbone_kwargs={"in_chans": 3}, epochs=1000, eval_every=1000)
    resumed = Trainer(cls_config(folder, run, max_steps=step + 2, **kw), resume=True)
    assert resumed.step == step
    resumed.fit()
    assert load_checkpoint(run / "last.safetensors").state["step"] == step + 2
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".*.tmp-*"))
