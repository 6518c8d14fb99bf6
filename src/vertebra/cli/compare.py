"""``vertebra compare``: backbones trained and scored as RetinaNet detectors under one budget (see
:mod:`vertebra.bench.compare`)."""

from __future__ import annotations

import argparse
import time

from . import _args as A
from ._console import console, print_error

__all__ = ["register", "cmd_compare"]


def _device(arg: str | None) -> str:
    from ..devices import default_device

    return default_device() if arg is None else arg


def _config(args):
    from ..bench.compare import CompareConfig
    from ..data.sources import DataSource

    source = DataSource(data=args.data, coco_ann=args.coco_ann, coco_images=args.coco_images,
                        val_coco_ann=args.val_coco_ann, val_coco_images=args.val_coco_images, voc=args.voc)
    minutes = None if args.steps is not None else (1.0 if args.minutes is None else args.minutes)
    return CompareConfig(source={k: v for k, v in source.to_dict().items() if v is not None and k in (
        "data", "coco_ann", "coco_images", "val_coco_ann", "val_coco_images", "voc")},
        size=args.size, minutes=minutes, steps=args.steps, seed=args.seed,
        preset="finetune" if args.pretrained else "scratch", batch=args.batch, val_limit=args.val_limit,
        curve_points=args.curve_points, device=_device(args.device), threads=args.threads, workers=args.workers)


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..bench.compare import compare_table_rows, plan_compare, run_compare

    try:
        cfg = _config(args)
        plan = plan_compare(args.names, cfg, family=args.family, survey=args.survey, out=args.out)
    except (KeyError, ValueError) as e:
        print_error(e.args[0] if isinstance(e, KeyError) and e.args else e)
        return 2
    plain = dict(markup=False, highlight=False)
    n_train = len(plan.names) - len(plan.excluded)
    per = (1.05 * cfg.minutes + 0.3) if cfg.minutes is not None else None  # + evaluations, timing, start-up
    console.print(f"comparing {n_train} backbones as RetinaNet detectors ({cfg.budget()} each, {cfg.preset} preset, "
                  f"{cfg.size} px, seed {cfg.seed}) into {plan.out}"
                  + (f"; about {n_train * per:.0f} min if none is done yet" if per else ""), **plain)
    for n, why in plan.excluded.items():
        console.print(f"  left out {n}: {why}", **plain)
    t0 = time.monotonic()

    def on_start(name: str, i: int, total: int, done: bool) -> None:
        if done:
            console.print(f"[{i + 1}/{total}] {name}: finished in an earlier run, kept", **plain)
        else:
            console.print(f"[{i + 1}/{total}] {name}: training ({time.monotonic() - t0:.0f} s into the run)", **plain)

    def on_row(row: dict) -> None:
        if row.get("status") == "ok":
            console.print(f"    {row['name']}: AP {row['AP']:.3f}  AP50 {row['AP50']:.3f}  {row['steps']} steps, "
                          f"{row['train_ips']:.1f} img/s, latency {row['latency_ms']:.1f} ms", **plain)
        else:
            console.print(f"    {row['name']}: {row.get('status')}: {row.get('error')}", **plain)

    try:
        rows = run_compare(plan, on_start=on_start, on_row=on_row)
    except KeyboardInterrupt:
        console.print(f"interrupted: the finished backbones are kept in {plan.out}; the same command continues",
                      **plain)
        return 130
    head, cells = compare_table_rows(rows, brief=True)
    t = Table(title=f"backbones as RetinaNet detectors: {cfg.budget()} each, {cfg.size} px, {cfg.preset} preset, "
                    f"seed {cfg.seed}", header_style="bold")
    for h in head:
        t.add_column(h, justify="left" if h in ("backbone", "family", "status", "note") else "right",
                     overflow="fold")
    for c in cells:
        t.add_row(*c)
    console.print(t)
    for r in rows:
        if r.get("status") not in ("ok", None):
            console.print(f"{r['name']} {r['status']}: {r.get('error')}", **plain)
    if args.against:
        _against(rows, args.against)
    bad = [r for r in rows if r.get("status") == "error"]
    console.print(f"report {plan.out / 'report.html'} (results.csv, results.json beside it); "
                  f"{len(bad)} failed" if bad else f"report {plan.out / 'report.html'} (results.csv, results.json "
                  "beside it)", **plain)
    return 1 if bad and len(bad) == n_train else 0


def _against(rows: list[dict], other: str) -> None:
    """Kendall's tau between this comparison's AP50 ranking and another's (e.g. the same run with another seed), and
    the pairs the two order differently."""
    import json
    from pathlib import Path

    from ..bench.compare import kendall_tau

    path = Path(other) / "results.json"
    try:
        theirs = json.loads(path.read_text(encoding="utf-8"))["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print_error(f"--against {other}: holds no comparison's results.json ({e})")
        return

    def score(rs):
        return {r["name"]: float(r["AP50"]) for r in rs if r.get("status") == "ok" and r.get("AP50") is not None}

    a, b = score(rows), score(theirs)
    tau, swaps = kendall_tau(a, b)
    both = sorted(set(a) & set(b))
    console.print(f"ranking by AP50 against {path} ({len(both)} backbones in both): Kendall's tau {tau:.3f}; "
                  f"{len(swaps)} of {len(both) * (len(both) - 1) // 2} pairs swap places"
                  + (": " + ", ".join(f"{p}/{q}" for p, q in swaps) if swaps else ""), markup=False, highlight=False)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="train and score many backbones as RetinaNet detectors under one budget (report.html)",
        description="The survey's experiment: each backbone trains a RetinaNet for the same time (or steps) on the "
                    "same data with the same preset, in a process of its own; then AP / AP50 / AP75 / APs/m/l, "
                    "the detector's latency, parameters, GMACs and training images/s, in a table, results.csv / "
                    "results.json and report.html (AP50 against latency with the Pareto front, AP50 against "
                    "training minutes, AP by object size). Running the same command again continues where it "
                    "stopped. With no names: a quick set of 8 families (about 11 min on 2 CPU cores at the "
                    "defaults); --survey: every headline network of the survey.")
    p.add_argument("names", nargs="*", metavar="NAME", help="backbones (vertebra list); default the quick set")
    p.add_argument("--family", default=None, help="every network of a family (vertebra list --family)")
    p.add_argument("--survey", action="store_true",
                   help="the survey's 31 headline networks (those that cannot be detectors are listed and left out)")
    g = p.add_argument_group("data (one source; none: the built-in shapes set)")
    g.add_argument("--data", metavar="DIR", type=A.existing_dir, help="a shapes set or a COCO-2017 layout folder")
    g.add_argument("--coco", dest="coco_ann", metavar="ANN", type=A.existing_file,
                   help="a COCO annotation file (with --images)")
    g.add_argument("--images", dest="coco_images", metavar="DIR", type=A.existing_dir, help="the images of --coco")
    g.add_argument("--val-coco", dest="val_coco_ann", metavar="ANN", type=A.existing_file,
                   help="validation annotation file (with --val-images)")
    g.add_argument("--val-images", dest="val_coco_images", metavar="DIR", type=A.existing_dir,
                   help="validation image folder (default --images)")
    g.add_argument("--voc", metavar="ROOT", type=A.existing_dir, help="a Pascal VOC year folder (trainval / test)")
    b = p.add_argument_group("budget and recipe (the same for every backbone)")
    b.add_argument("--minutes", type=A.POSITIVE, default=None,
                   help="training minutes per backbone (default 1; evaluation and timing are not counted)")
    b.add_argument("--steps", type=A.POSITIVE_INT, default=None, help="optimizer steps per backbone instead")
    b.add_argument("--size", type=A.SIZE, default=128, help="training and evaluation size (default 128)")
    b.add_argument("--pretrained", action="store_true",
                   help="fine-tune each network's published weights (finetune preset; networks without weights "
                        "are left out); default from random init (scratch preset)")
    b.add_argument("--batch", type=A.POSITIVE_INT, default=8, help="images per step (default 8)")
    b.add_argument("--seed", type=A.SEED, default=0, help="random seed (default 0)")
    b.add_argument("--val-limit", type=A.POSITIVE_INT, default=100, metavar="N",
                   help="evaluate on the first N validation images (default 100)")
    b.add_argument("--curve-points", type=A.integer(1, 20), default=3, metavar="K",
                   help="evaluations per backbone (AP50 against minutes; the last is the final one; default 3)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="report folder (default reports/compare-<data>-<preset>-<budget>-<size>px-s<seed>-<hash>)")
    r.add_argument("--device", type=A.device, default=None,
                   help="cpu, cuda (one backbone per GPU at a time) ... (default: cuda when available)")
    r.add_argument("--threads", type=A.POSITIVE_INT, default=None, help="torch CPU threads per backbone")
    r.add_argument("--workers", type=A.COUNT, default=0, help="data-loading processes per backbone (default 0)")
    r.add_argument("--against", metavar="DIR", type=A.existing_dir, default=None,
                   help="another comparison's folder (e.g. the same with another --seed): print "
                        "Kendall's tau between the two AP50 rankings and the pairs that swap")
    p.set_defaults(handler=cmd_compare, _check=_check, _parser=p)


def _check(args) -> None:
    if args.minutes is not None and args.steps is not None:
        raise A.UsageError("--steps", "give the budget as --minutes or --steps, not both")
    if args.names and (args.family or args.survey):
        raise A.UsageError("--family", "give backbone names, --family or --survey (one of them)")
    if args.family and args.survey:
        raise A.UsageError("--survey", "give --family or --survey, not both")
    if args.coco_ann is not None and args.coco_images is None:
        raise A.UsageError("--coco", "give the image folder with --images")
