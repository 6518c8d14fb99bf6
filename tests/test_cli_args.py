"""Every flag of every command is checked where it is parsed: a table walks each numeric flag with values outside
its domain (and not numbers at all), each path flag with a path that is not there, and the checks that need two
flags or the backbone (sizes, devices, precision). A bad value is argparse's usage error (exit 2) whose last line
names the flag and the value, before anything is read or written."""

from __future__ import annotations

import argparse

import pytest
import torch

from vertebra.cli import _args as A
from vertebra.cli import build_parser, main
from vertebra.devices import check_device

#: the arguments each command needs besides the flag under test (positional and required ones)
REQUIRED = {
    "train": [], "eval": ["--checkpoint", "{ck}"], "predict": ["{img}", "--pretrained"], "list": [],
    "info": ["resnet18"], "bench": [], "export": ["resnet18"], "classify": ["{img}", "--backbone", "resnet18"],
    "data shapes": ["--out", "{tmp}/shapes"], "weights list": [], "weights download": ["resnet18"],
    "weights path": ["resnet18"], "compare": [], "data stats": [],
}


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its words: ``train``, ``data shapes``, ``weights list`` ..."""
    out = {}

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out[" ".join(words)] = parser
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, [*words, name])

    walk(build_parser(), [])
    return out


def _bad_values(bounds: dict) -> list[str]:
    lo, hi, kind = bounds["lo"], bounds["hi"], bounds["kind"]
    bad = ["x"]
    if kind is int:
        bad.append("1.5")
        if lo is not None:
            bad.append(str(lo - 1))
        if hi is not None:
            bad.append(str(hi + 1))
    else:
        bad += ["nan", "inf"]
        if lo is not None:
            bad.append(str(lo) if bounds["lo_open"] else str(lo - 1))
        if hi is not None:
            bad.append(str(hi) if bounds["hi_open"] else str(hi + 0.5))
    return bad


def numeric_cases() -> list[tuple[str, str, str]]:
    cases = []
    for words, parser in commands().items():
        for action in parser._actions:
            bounds = getattr(action.type, "bounds", None)
            if bounds and action.option_strings:
                cases += [(words, action.option_strings[0], v) for v in _bad_values(bounds)]
    return cases


def path_cases() -> list[tuple[str, str]]:
    checked = (A.existing_file, A.existing_dir, A.file_or_url)
    return [(words, a.option_strings[0]) for words, parser in commands().items() for a in parser._actions
            if a.type in checked and a.option_strings]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("args")
    (tmp / "ck.safetensors").write_bytes(b"not read: the flag under test fails first")
    (tmp / "x.jpg").write_bytes(b"")
    return {"ck": str(tmp / "ck.safetensors"), "img": str(tmp / "x.jpg"), "tmp": str(tmp)}


def usage_error(argv: list[str], capsys) -> str:
    """The last stderr line of ``vertebra ARGV``, which must exit 2 through argparse's error."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2, argv
    return capsys.readouterr().err.strip().splitlines()[-1]


def _argv(words: str, files, *rest: str) -> list[str]:
    return [*words.split(), *(s.format(**files) for s in REQUIRED[words]), *rest]


def test_every_command_is_in_the_table_and_no_numeric_flag_is_unchecked():
    assert set(commands()) == set(REQUIRED)
    raw = [(w, a.option_strings[0]) for w, p in commands().items() for a in p._actions if a.type in (int, float)]
    assert raw == [], f"flags typed int/float with no domain (use vertebra.cli._args): {raw}"
    assert len(numeric_cases()) > 100 and len(path_cases()) >= 10


@pytest.mark.parametrize("words, flag, value", numeric_cases(), ids=lambda v: str(v))
def test_a_bad_number_is_a_usage_error_naming_flag_and_value(words, flag, value, files, capsys):
    line = usage_error(_argv(words, files, f"{flag}={value}"), capsys)
    assert f"error: argument {flag}" in line and repr(value) in line and "must be" in line, line


@pytest.mark.parametrize("words, flag", path_cases(), ids=lambda v: str(v))
def test_a_missing_path_is_a_usage_error(words, flag, files, capsys):
    line = usage_error(_argv(words, files, flag, f"{files['tmp']}/missing"), capsys)
    assert f"error: argument {flag}" in line and "missing" in line and "no such" in line, line


@pytest.mark.parametrize("argv, message", [
    # the values an earlier main took: --batch 0 trained with batch 8, --threads 0 with every core, --save-every 0
    # and --clip 0 silently turned their feature off, --eval-every 0 ended in ZeroDivisionError after an epoch
    (["train", "--batch", "0"], "argument --batch: invalid value '0': must be an integer >= 1"),
    (["train", "--lr", "0"], "argument --lr: invalid value '0': must be a number > 0"),
    (["train", "--epochs", "0"], "argument --epochs: invalid value '0': must be an integer >= 1"),
    (["train", "--size", "0"], "argument --size: invalid value '0': must be an integer >= 16"),
    (["train", "--threads", "0"], "argument --threads: invalid value '0': must be an integer >= 1"),
    (["train", "--workers", "-1"], "argument --workers: invalid value '-1': must be an integer >= 0"),
    (["train", "--max-minutes", "-5"], "argument --max-minutes: invalid value '-5': must be a number > 0"),
    (["train", "--ema", "2"], "argument --ema: invalid value '2': must be a number in [0, 1)"),
    (["train", "--clip", "-1"], "argument --clip: invalid value '-1': must be a number > 0"),
    (["train", "--eval-every", "0"], "argument --eval-every: invalid value '0': must be an integer >= 1"),
    (["train", "--seed", "-1"], "argument --seed: invalid value '-1': must be an integer in [0, 4294967295]"),
    (["train", "--progressive", "128:0.5,96:0.4"], "each UNTIL must be a fraction in (0, 1] larger than the one"),
    (["train", "--size", "48", "--backbone", "alexnet"], "argument --size: invalid value 48: alexnet needs inputs "
                                                         "of at least 63 px"),
    (["train", "--progressive", "24:0.5", "--backbone", "resnet18"], "argument --progressive: invalid value 24: "
                                                                     "resnet18 needs inputs of at least 32 px"),
    (["train", "--schedule-on-time"], "argument --schedule-on-time: the schedule runs over the time budget"),
    (["train", "--dtype", "fp16", "--device", "cpu"], "argument --dtype: fp16 is for CUDA"),
    (["predict", "{img}", "--pretrained", "--score-thresh", "1.5"], "must be a number in [0, 1]"),
    (["bench", "--runs", "0"], "argument --runs: invalid value '0': must be an integer >= 1"),
    (["bench", "alexnet", "--size", "32"], "argument --size: invalid value 32: alexnet needs inputs of at least"),
    (["bench", "--dtype", "fp16"], "argument --dtype: fp16 is for CUDA"),
    (["info", "resnet18", "--size", "20"], "argument --size: invalid value 20: resnet18 needs inputs of at least"),
    (["export", "alexnet", "--size", "40"], "argument --size: invalid value 40: alexnet needs inputs of at least"),
    (["export", "resnet18", "--opset", "11"], "argument --opset: invalid value '11': must be an integer >= 17"),
    (["classify", "{img}", "--backbone", "resnet18", "--topk", "0"], "argument --topk: invalid value '0'"),
    (["data", "shapes", "--out", "{tmp}/s", "--size", "16"], "argument --size: invalid value '16': must be an "
                                                              "integer >= 32"),
])
def test_the_values_that_used_to_pass(argv, message, files, capsys):
    line = usage_error([a.format(**files) for a in argv], capsys)
    assert message in line, line


def test_devices_that_are_not_there(monkeypatch, capsys):
    """One line naming the device and what this machine has, before any data is read."""
    if not torch.cuda.is_available():
        line = usage_error(["train", "--device", "cuda"], capsys)
        assert "argument --device: invalid value 'cuda': not available" in line and "(available: cpu)" in line
    line = usage_error(["train", "--device", "meta"], capsys)
    assert "invalid value 'meta'" in line and "vertebra runs on cpu, cuda[:N] or mps" in line, line
    line = usage_error(["eval", "--checkpoint", __file__, "--device", "gpu"], capsys)
    assert "invalid value 'gpu': not a device name" in line
    # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0").index == 0 and check_device("cuda").type == "cuda"
    with pytest.raises(ValueError, match=r"--device cuda:3: not available, this machine has 1 CUDA device\(s\) "
                                         r"\(available: cpu, cuda:0\)"):
        check_device("cuda:3")
    line = usage_error(["bench", "--device", "cuda:3"], capsys)
    assert "argument --device: invalid value 'cuda:3'" in line and "cpu, cuda:0" in line


def test_good_values_and_defaults_pass():
    p = build_parser()
    a = p.parse_args(["train", "--batch", "1", "--lr", "1e-5", "--ema", "0", "--label-smoothing", "0.1", "--clip",
                      "0.5", "--workers", "0", "--seed", "4294967295", "--warmup", "0", "--max-minutes", "0.5"])
    assert (a.batch, a.lr, a.ema, a.label_smoothing, a.clip, a.workers) == (1, 1e-5, 0.0, 0.1, 0.5, 0)
    assert a.seed == 2**32 - 1
    for parser in commands().values():  # every default lies in its flag's domain
        for action in parser._actions:
            if getattr(action.type, "bounds", None) and action.default not in (None, argparse.SUPPRESS, []):
                action.type(str(action.default))


def test_engine_config_checks_the_same_domains():
    """A library user's TrainConfig gets the same refusals, none taken as "not given"."""
    from vertebra.engine.config import TrainConfig

    for field, value in [("batch", 0), ("lr", 0.0), ("threads", 0), ("workers", -1), ("max_minutes", -5.0),
                         ("clip", -1.0), ("eval_every", 0), ("save_every", 0), ("seed", -1), ("step_epochs", [0]),
                         ("max_steps", 0), ("warmup_steps", -1), ("ema", 1.0), ("label_smoothing", 1.0)]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: value}).validate()
    TrainConfig(lr=1e-3, clip=1.0, threads=1, save_every=1, warmup_steps=0).validate()
