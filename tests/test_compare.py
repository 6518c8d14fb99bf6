"""``vertebra compare``: backbones trained as detectors under one budget, each in its own process; the plan, the
results, the report and a comparison killed in the middle that continues without retraining what it finished."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vertebra.bench.compare import (
    CompareConfig,
    detector_problem,
    kendall_tau,
    pareto_front,
    plan_compare,
    write_compare_report,
)
from vertebra.cli import main
from vertebra.data import write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare") / "shapes"
    write_shapes(root, num_train=8, num_val=4, size=64, seed=2)
    return root


def test_a_backbone_that_cannot_be_a_detector_is_listed_with_its_reason(tmp_path):
    assert "stride 8" in detector_problem("lenet5", 128)
    assert "stride 8" in detector_problem("resnet110_sd", 128)  # a CIFAR network
    assert detector_problem("resnet18", 128) is None
    assert "smallest input" in detector_problem("inception_v3", 64)
    plan = plan_compare(["resnet18", "lenet5"], CompareConfig(steps=1, minutes=None), out=tmp_path / "c")
    assert plan.names == ["resnet18", "lenet5"] and set(plan.excluded) == {"lenet5"}
    with pytest.raises(KeyError, match="resnet18"):
        plan_compare(["resnet81"], CompareConfig())
    with pytest.raises(ValueError, match="minutes or as steps"):
        plan_compare(["resnet18"], CompareConfig(steps=5))  # both budgets


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    cfg = CompareConfig(steps=2, minutes=None)
    (tmp_path / "compare.json").write_text(json.dumps({"settings": cfg.key()}))
    plan_compare(["resnet18"], cfg, out=tmp_path)  # the same: continues
    with pytest.raises(ValueError, match="other settings.*seed 0 -> 1"):
        plan_compare(["resnet18"], CompareConfig(steps=2, minutes=None, seed=1), out=tmp_path)
    plan_compare(["resnet18"], CompareConfig(steps=2, minutes=None, threads=1), out=tmp_path)  # runtime only


def test_pareto_front_and_kendall_tau():
    rows = [{"name": "a", "status": "ok", "latency_ms": 10, "AP50": 0.5},
            {"name": "b", "status": "ok", "latency_ms": 20, "AP50": 0.4},  # slower and worse than a
            {"name": "c", "status": "ok", "latency_ms": 30, "AP50": 0.7},
            {"name": "d", "status": "ok", "latency_ms": 5, "AP50": 0.1},
            {"name": "e", "status": "error"}]
    assert pareto_front(rows) == ["d", "a", "c"]
    tau, swaps = kendall_tau({"a": 3, "b": 2, "c": 1}, {"a": 3, "b": 2, "c": 1})
    assert tau == pytest.approx(1.0) and swaps == []
    tau, swaps = kendall_tau({"a": 3, "b": 2, "c": 1}, {"a": 3, "b": 1, "c": 2})
    assert tau == pytest.approx(1 / 3) and swaps == [("b", "c")]
    tau, _ = kendall_tau({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1})
    assert tau == pytest.approx(-1.0)


def test_report_has_the_three_plots_and_the_settings(tmp_path):
    rows = [{"name": n, "family": f, "status": "ok", "AP": ap / 2, "AP50": ap, "AP75": ap / 3, "APs": ap / 4,
             "APm": ap / 2, "APl": ap, "latency_ms": lat, "params_m": 3.0, "gmacs": 1.0, "train_ips": 10.0,
             "steps": 5, "train_minutes": 1.0, "curve": [[0.5, ap / 2], [1.0, ap]]}
            for n, f, ap, lat in (("resnet18", "ResNet", 0.4, 20.0), ("mobilenet_v2", "MobileNetV2", 0.3, 10.0))]
    rows.append({"name": "lenet5", "family": "LeNet", "status": "excluded", "error": "cannot reach stride 8"})
    page = write_compare_report(tmp_path, rows, {"cpu": "test"}, CompareConfig(minutes=2.0, seed=3))
    text = page.read_text()
    for key in ("ap50_vs_latency", "ap50_vs_minutes", "ap_by_size"):
        assert f"alt='{key}'" in text and (tmp_path / f"{key}.png").is_file()
    assert "2 min of training" in text and "seed 3" in text and "scratch" in text and "cannot reach stride 8" in text
    assert "Pareto front" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["pareto_front"] == ["mobilenet_v2", "resnet18"] and len(data["rows"]) == 3
    assert (tmp_path / "results.csv").read_text().count("\n") == 4


def _argv(shapes, out):
    return [sys.executable, "-m", "vertebra", "compare", "mobilenet_v2", "shufflenet_v2_x0_5", "lenet5", "--data",
            str(shapes), "--steps", "2", "--size", "64", "--batch", "4", "--val-limit", "2", "--curve-points", "1",
            "--threads", "1", "--out", str(out)]


def test_a_killed_comparison_continues_without_retraining(shapes, tmp_path):
    """kill -9 of the comparison once its first backbone is done: no child outlives it, and the same command
    afterwards trains only the second backbone (the first one's row and log are untouched)."""
    out = tmp_path / "cmp"
    env = dict(os.environ, VERTEBRA_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_argv(shapes, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "runs" / "mobilenet_v2" / "row.json"
    second_spec = out / "runs" / "shufflenet_v2_x0_5" / "child.json"
    deadline = time.monotonic() + 300
    while not second_spec.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_file(), "the first backbone did not finish"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the second backbone's child dies with its parent (Linux): nothing keeps training or holds the run folder
    time.sleep(2)
    if sys.platform.startswith("linux"):
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(second_spec) not in ps
    before = (first.stat().st_mtime_ns, (out / "runs" / "mobilenet_v2" / "train.log").read_bytes())
    done = subprocess.run(_argv(shapes, out), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mobilenet_v2: finished in an earlier run, kept" in done.stdout
    assert (first.stat().st_mtime_ns, (out / "runs" / "mobilenet_v2" / "train.log").read_bytes()) == before
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["mobilenet_v2"]["status"] == "ok" and rows["shufflenet_v2_x0_5"]["status"] == "ok"
    assert rows["lenet5"]["status"] == "excluded" and "stride 8" in rows["lenet5"]["error"]
    for r in (rows["mobilenet_v2"], rows["shufflenet_v2_x0_5"]):
        assert r["steps"] == 2 and r["latency_ms"] > 0 and r["params_m"] > 0 and 0.0 <= r["AP50"] <= 1.0
    assert (out / "report.html").is_file()


def test_a_crashing_backbone_is_its_rows_error(shapes, tmp_path, monkeypatch, capsys):
    """A child that fails (here: training data that cannot be read) is an error row; the run goes on and ends."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "annotations").mkdir()
    (bad / "annotations" / "instances_train.json").write_text("{not json")
    (bad / "train").mkdir()
    rc = main(["compare", "shufflenet_v2_x0_5", "--data", str(bad), "--steps", "1", "--size", "64",
               "--out", str(tmp_path / "c"), "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 1 and "error" in out  # every trained backbone failed: a non-zero exit
    rows = json.loads((tmp_path / "c" / "results.json").read_text())["rows"]
    assert rows[0]["status"] == "error" and "instances_train.json" in rows[0]["error"]
