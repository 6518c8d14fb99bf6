"""RetinaNet + ResNet-18 from random init on the shapes set, on CPU, against a time budget.

Goal: COCO AP50 >= 0.8 on the shapes val split (300 images, 256 x 256 px, the default set of
``vertebra data shapes``) within 10 minutes of training on 2 CPU cores.

The recipe is the engine's ``scratch`` preset (``vertebra.engine.presets``; what ``vertebra train`` uses for a
backbone without weights): evaluation at 256 x 256, progressive resizing over the time budget (128 px for the
first 60 %, 192 px until 80 %, then 256), batch 16, horizontal flips; ResNet-18 from random init with live
BatchNorm; a RetinaNet with a 128-channel FPN and head towers of 2 convs with GroupNorm; anchors fitted to the
training boxes (on this set: 1.5 x stride on P3-P6, what an earlier version of this script chose by hand); AdamW
(lr 4e-3, weight decay 0.05), 150 warm-up steps (at most a tenth of the budget), cosine over the time budget; the
EMA of the weights (decay 0.995) is evaluated; bf16 autocast where the CPU computes in bf16 natively, and
channels_last. The flags below override single parts of it; config.json in the run folder lists every value.

It trains with ``max_minutes`` (training time; evaluations are not counted), evaluates AP50 on the val
split every ``--eval-every`` minutes (optionally on its first ``--val-limit`` images to save time), then
AP / AP50 / AP75 on the whole val split at the end. It prints and writes the curve (AP50 against
training minutes) as ``curve.json`` and ``curve.png`` in the run folder, next to the engine's
``metrics.csv`` and ``loss.png``. The machine load (``os.getloadavg``) is printed with the figures:
a shared machine trains several times slower than an idle one.

The measured figures are in ``benchmarks/RESULTS.md`` (section shapes_retinanet).

    python benchmarks/shapes_retinanet.py                       # 10 minutes, the recipe above
    python benchmarks/shapes_retinanet.py --minutes 5 --eval-every 2.5 --val-limit 100
    python benchmarks/shapes_retinanet.py --breakdown 20          # where a step's time goes, at each size
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from vertebra.cli.train import _progressive
from vertebra.data.sources import DataSource, ensure_shapes
from vertebra.detection.anchors import scaled_anchor_sizes
from vertebra.engine.config import TrainConfig
from vertebra.engine.presets import apply_preset
from vertebra.engine.train import RunExistsError, Trainer


def step_breakdown(trainer: Trainer, steps: int) -> int:
    """Median milliseconds of each phase of ``steps`` training steps (after 3 untimed ones) at every input size of
    the trainer's progressive schedule: the phases of ``Trainer.train_step`` run one by one on the trainer's own
    loader, model, loss, optimizer and EMA."""
    import statistics

    sizes = sorted({s for s, _ in trainer.cfg.progressive} | {trainer.size}) if trainer.cfg.progressive \
        else [trainer.size]
    loader = iter(trainer._train_loader(0, 0))
    phases = ("data", "forward + loss", "backward", "optimizer", "EMA")
    print(f"{'size':>5} " + "".join(f"{p:>16}" for p in phases) + f"{'step':>10}{'images/s':>10}   (ms, median of "
          f"{steps})")
    model = trainer.model.train()
    for size in sizes:
        trainer.train_size = lambda s=size: s
        times = {p: [] for p in phases}
        for i in range(steps + 3):
            t = [time.perf_counter()]
            batch = next(loader)
            t.append(time.perf_counter())
            trainer.optimizer.zero_grad(set_to_none=True)
            total, _, n = trainer.compute_loss(batch)
            float(total.detach())
            t.append(time.perf_counter())
            total.backward()
            t.append(time.perf_counter())
            trainer.optimizer.step()
            t.append(time.perf_counter())
            if trainer.ema is not None:
                trainer.ema.update(model)
            t.append(time.perf_counter())
            if i >= 3:
                for p, a, b in zip(phases, t, t[1:]):
                    times[p].append(1000 * (b - a))
        med = {p: statistics.median(v) for p, v in times.items()}
        step = sum(med.values())
        print(f"{size:>5} " + "".join(f"{med[p]:>16.1f}" for p in phases) + f"{step:>10.1f}"
              f"{trainer.plan.batch * 1000 / step:>10.1f}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/shapes", help="shapes set (generated there if absent)")
    p.add_argument("--out", default="runs/bench_shapes_retinanet")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    p.add_argument("--eval-every", type=float, default=3.0, help="minutes of training between evaluations")
    p.add_argument("--val-limit", type=int, default=None, help="evaluate the curve on the first N val images")
    p.add_argument("--size", type=int, default=256)
    g = p.add_argument_group("overrides of the preset (default: the preset's value)")
    g.add_argument("--progressive", default=None, metavar="SIZE:UNTIL,...",
                   help="progressive resizing over the time budget ('none': all at --size)")
    g.add_argument("--batch", type=int, default=None, help="images per step (the preset's: 16)")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--warmup", type=int, default=None)
    g.add_argument("--fpn-channels", type=int, default=None)
    g.add_argument("--head-convs", type=int, default=None)
    g.add_argument("--head-norm", default=None, choices=("gn", "none"))
    g.add_argument("--anchor-mult", type=float, default=None,
                   help="anchors by hand: base size = mult x stride on P3-P6 (default: fitted to the boxes)")
    g.add_argument("--matcher", default=None, choices=("iou", "atss"),
                   help="anchor assignment: the paper's IoU 0.5 / 0.4 rule or ATSS")
    g.add_argument("--box-loss", default=None, choices=("l1", "giou"))
    g.add_argument("--ema", type=float, default=None)
    g.add_argument("--no-amp", action="store_true", help="float32 even where the CPU computes in bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", type=int, default=0, metavar="STEPS",
                   help="instead of training to the budget: time STEPS steps at each size of the progressive "
                        "schedule and print where a step's time goes (data, forward + loss, backward, optimizer, "
                        "EMA; medians)")
    args = p.parse_args(argv)

    root = ensure_shapes(Path(args.data))
    det_kw = {k: v for k, v in (("fpn_channels", args.fpn_channels), ("head_convs", args.head_convs),
                                ("matcher", args.matcher), ("box_loss", args.box_loss)) if v is not None}
    if args.head_norm is not None:
        det_kw["head_norm"] = None if args.head_norm == "none" else "gn"
    if args.anchor_mult is not None:
        det_kw.update(anchor_sizes=scaled_anchor_sizes(args.anchor_mult, range(3, 7)), max_level=6)
    given = {"lr": args.lr, "warmup_steps": args.warmup, "ema": args.ema, "batch": args.batch}
    given = {k: v for k, v in given.items() if v is not None}
    if args.progressive is not None:
        given["progressive"] = [] if args.progressive == "none" else _progressive(args.progressive)
    if args.no_amp:
        given["amp"] = None
    cfg = TrainConfig(task="det", source=DataSource(data=str(root)), size=args.size, backbone="resnet18",
                      preset="scratch", detector_kwargs=det_kw, out=args.out,
                      max_minutes=args.minutes, eval_every=10**6, eval_every_minutes=args.eval_every, log_every=10,
                      workers=args.workers, seed=args.seed, threads=args.threads, progress=True, **given)
    cfg = apply_preset(cfg, explicit={*given, "size"})  # the Trainer prints what it set
    load0 = os.getloadavg()
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch threads "
          f"{args.threads or torch.get_num_threads()}; load average at start {load0[0]:.1f} / {load0[1]:.1f} / "
          f"{load0[2]:.1f}")
    if args.breakdown:  # timings only: the run folder is a scratch one, removed after
        with tempfile.TemporaryDirectory(prefix="shapes-breakdown-") as tmp:
            return step_breakdown(Trainer(dataclasses.replace(cfg, out=tmp, exist_ok=True)), args.breakdown)
    try:
        trainer = Trainer(cfg)
    except RunExistsError:
        raise SystemExit(f"error: {args.out} holds a run already: give another --out, or remove it") from None
    full_val = trainer.val_set
    if args.val_limit and full_val is not None:
        import copy

        sub = copy.copy(full_val)
        sub.records = full_val.records[: args.val_limit]
        trainer.val_set = sub
    print(f"train {len(trainer.train_set)} images, val {len(full_val)} images at {args.size} px; "
          f"budget {args.minutes:g} min of training")
    t0 = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    curve = [(float(r["train_minutes"]), float(r["AP50"])) for r in trainer.rows
             if r.get("kind") == "eval" and r.get("AP50") not in (None, "")]
    trainer.val_set = full_val
    final = trainer.evaluate(breakdown=True)
    curve.append((trainer.train_seconds / 60, final["AP50"]))
    load1 = os.getloadavg()
    imgs = summary["steps"] * trainer.plan.global_batch
    result = {
        "final": {k: final[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP_agnostic", "AP50_agnostic")},
        "final_per_class": {k: v for k, v in final.items() if "/" in k},
        "curve_minutes_ap50": curve,
        "train_minutes": trainer.train_seconds / 60, "wall_minutes": wall / 60, "steps": summary["steps"],
        "images_seen": imgs, "images_per_s": imgs / max(trainer.train_seconds, 1e-9),
        "epochs": summary["epochs"], "load_start": load0, "load_end": load1,
        "threads": args.threads or torch.get_num_threads(), "size": args.size, "recipe": vars(args),
        "preset": cfg.preset, "preset_values": cfg.preset_values, "anchors": trainer.anchor_fit,
        "val_images_curve": len(full_val) if not args.val_limit else min(args.val_limit, len(full_val)),
        "val_images_final": len(full_val),
    }
    out = Path(args.out)
    (out / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-")
        ax.axhline(0.8, color="gray", ls="--", lw=1)
        ax.set_xlabel("training minutes")
        ax.set_ylabel("COCO AP50 (val)")
        ax.set_ylim(0, 1)
        ax.set_title(f"RetinaNet ResNet-18 on shapes {args.size}px, load {load0[0]:.1f}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "curve.png")
        plt.close(fig)
    except ImportError:
        pass
    print("AP50 against training minutes:")
    for m, ap in curve:
        print(f"  {m:6.2f} min  AP50 {ap:.3f}")
    f = result["final"]
    print(f"final (val, {len(full_val)} images): AP {f['AP']:.3f}  AP50 {f['AP50']:.3f}  AP75 {f['AP75']:.3f}; "
          f"{result['images_per_s']:.2f} images/s, {imgs} images ({summary['epochs']:.2f} epochs) in "
          f"{result['train_minutes']:.1f} min; load {load0[0]:.1f} -> {load1[0]:.1f}")
    confused = "  (AP50 well below it: the classes are confused)" if f["AP50"] < 0.8 * f["AP50_agnostic"] else ""
    print(f"class-agnostic AP {f['AP_agnostic']:.3f}  AP50 {f['AP50_agnostic']:.3f}{confused}")
    print("AP50 per class: " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in result["final_per_class"].items()
                                          if k.startswith("AP50/")))
    print(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
