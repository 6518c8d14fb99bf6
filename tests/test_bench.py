"""vertebra bench: MAC counting, the measurement rows, the report files and bad input; the CLI's frame."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vertebra
from vertebra.bench.measure import BenchConfig, check_config, count_macs, macs_of
from vertebra.bench.runner import ROW_COLUMNS
from vertebra.cli import build_parser, main


def test_gmacs_resnet50_and_mobilenet_v2():
    assert macs_of("resnet50").gmacs == pytest.approx(4.1, rel=0.02)
    assert macs_of("mobilenet_v2").gmacs == pytest.approx(0.30, rel=0.03)


def test_macs_scale_with_input_and_batch():
    with torch.device("meta"):
        m = vertebra.create_backbone("resnet18")
    a = count_macs(m, (3, 128, 128)).gmacs
    b = count_macs(m, (3, 256, 256)).gmacs
    c = count_macs(m, (3, 128, 128), batch=2).gmacs
    assert b == pytest.approx(4 * a, rel=0.02) and c == pytest.approx(2 * a, rel=1e-6)


@pytest.mark.parametrize("kw, msg", [
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "tpu"}, "not"),
    ({"dtype": "fp16"}, "fp16 is for CUDA"),
    ({"dtype": "int3"}, "unknown dtype"),
    ({"batch": 0}, "at least 1"),
])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        check_config(BenchConfig(**kw))


def run_cli(args, capsys):
    try:
        code = main(["bench", *args])
    except SystemExit as e:  # a usage error
        code = e.code
    return code, capsys.readouterr()


def test_bench_rows_report_and_compare(tmp_path, capsys):
    out = tmp_path / "rep"
    code, io = run_cli(["resnet18", "--input", "32", "--batch", "2", "--runs", "1", "--compare", "--out", str(out)],
                       capsys)
    assert code == 0, io.err
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(ROW_COLUMNS) <= set(rows[0])
    libs = {r["library"]: r for r in rows}
    assert {"vertebra", "torchvision:resnet18"} <= set(libs)
    ours = libs["vertebra"]
    assert ours["status"] == "ok"
    assert float(ours["params_m"]) == pytest.approx(sum(p.numel() for p in vertebra.create_backbone("resnet18")
                                                        .parameters()) / 1e6)
    for col in ("latency_ms", "throughput_ips", "train_ips", "peak_mem_mb", "gmacs", "peak_fraction", "ratio_vs_peer"):
        assert float(ours[col]) > 0, col
    assert ours["cpu"] and ours["torch"] == torch.__version__
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cores"] and len(data["rows"]) == len(rows)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "resnet18" in page
    assert (out / "paper_chart.png").stat().st_size > 1000 and (out / "ratio.png").exists()
    assert "report:" in io.out


def test_compare_says_plainly_without_timm(tmp_path, capsys, monkeypatch):
    import vertebra.bench.runner as runner
    import vertebra.reference.twins as twins

    monkeypatch.setattr(twins, "has_timm", lambda: False)
    monkeypatch.setattr(runner, "peers_of", lambda name: ["torchvision:resnet18"])
    code, io = run_cli(["resnet18", "--input", "32", "--batch", "1", "--runs", "1", "--no-train", "--compare",
                        "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "timm is not installed" in io.err


def test_failing_network_is_reported_and_run_goes_on(tmp_path, capsys):
    # a CIFAR net cannot reach stride 8: its detector fails to build, the next network still runs
    code, io = run_cli(["resnet110_sd", "resnet18", "--task", "det", "--det-size", "64", "--batch", "1", "--runs", "1",
                        "--out", str(tmp_path)], capsys)
    assert code == 0
    with open(tmp_path / "results.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["resnet110_sd"]["status"] == "error" and "stride" in rows["resnet110_sd"]["error"]
    assert rows["resnet18"]["status"] == "ok" and float(rows["resnet18"]["postprocess_ms"]) > 0


@pytest.mark.parametrize("args, msg", [
    (["resnet51"], "closest"),
    (["resnet18", "--input", "16"], "resnet18 needs inputs of at least 32 px"),
    (["resnet18", "--dtype", "fp16"], "fp16 is for CUDA"),
])
def test_bad_input_exits_nonzero(args, msg, capsys, tmp_path):
    code, io = run_cli([*args, "--out", str(tmp_path)], capsys)
    assert code != 0 and msg in io.err
    assert not (tmp_path / "results.csv").exists()


def test_compare_refused_for_detection(tmp_path, capsys):
    code, io = run_cli(["resnet18", "--task", "det", "--compare", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--compare" in io.err
    assert not (tmp_path / "results.csv").exists()


# -- the CLI's frame -----------------------------------------------------------------------

COMMANDS = ["list", "info", "bench", "data", "train", "eval", "predict", "export", "classify", "weights"]


def _subcommands(parser):
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_subcommand_has_a_handler():
    subs = _subcommands(build_parser())
    assert set(COMMANDS) <= set(subs)
    groups = ("data", "weights")  # commands with subcommands of their own
    leaves = {n: p for n, p in subs.items() if n not in groups}
    for g in groups:
        leaves.update({f"{g} {n}": p for n, p in _subcommands(subs[g]).items()})
    assert "data shapes" in leaves
    for name, p in leaves.items():
        assert callable(p.get_default("handler")), name


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "vertebra", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert re.search(rf"\b{name}\b", proc.stdout), name



def test_no_argparse_outside_cli():
    src = Path(vertebra.__file__).parent
    offenders = [str(p.relative_to(src)) for p in sorted(src.rglob("*.py"))
                 if p.relative_to(src).parts[0] != "cli" and re.search(r"\bargparse\b", p.read_text())]
    assert not offenders, f"argparse outside vertebra/cli/: {offenders}"
