"""RetinaNet + ResNet-18 from random init on the shapes set, on CPU, against a time budget.

Goal: COCO AP50 >= 0.8 on the shapes val split (300 images, 256 x 256 px, the default set of
``vertebra data shapes``) within 15 minutes of training on 2 CPU cores, never more than 30.

The recipe (every part can be changed from the command line):

* evaluation at 256 x 256 (the set's own size); training with progressive resizing over the time budget
  (``--progressive 128:0.6,192:0.8``): the first 60 % of the time at 128 px, then 192 px until 80 %, the last
  20 % at 256 px (the images and their boxes are downscaled in the detector's preprocessing, in one
  interpolation per batch); batch 8, horizontal flips only;
* ResNet-18 from random init, every stage trained, live BatchNorm (frozen BN is for pretrained nets);
* a lighter RetinaNet: FPN of 128 channels on P3-P6 (objects are 5-128 px; P7 would only see 2 x 2 cells),
  head towers of 2 convs (not 4) with GroupNorm (stable from scratch with a high learning rate);
* anchors that fit the objects: 1.5 x stride x 2^(0, 1/3, 2/3) (12-19 px on P3 up to 96-152 px on P6),
  aspect ratios 1:2, 1:1, 2:1;
* AdamW, lr 2e-3, weight decay 0.05, 150 warm-up steps, then cosine over the time budget;
* an EMA of the weights (decay 0.995) is what is evaluated;
* bf16 autocast and channels_last on CPU (the loss in float32).

It trains with ``max_minutes`` (training time; evaluations are not counted), evaluates AP50 on the val
split every ``--eval-every`` minutes (optionally on its first ``--val-limit`` images to save time), then
AP / AP50 / AP75 on the whole val split at the end. It prints and writes the curve (AP50 against
training minutes) as ``curve.json`` and ``curve.png`` in the run folder, next to the engine's
``metrics.csv`` and ``loss.png``. The machine load (``os.getloadavg``) is printed with the figures:
a shared machine trains several times slower than an idle one.

The measured figures are in ``benchmarks/RESULTS.md`` (section shapes_retinanet).

    python benchmarks/shapes_retinanet.py                       # 15 minutes, the recipe above
    python benchmarks/shapes_retinanet.py --minutes 5 --eval-every 2.5 --val-limit 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from vertebra.cli.train import _progressive
from vertebra.data.sources import DataSource, ensure_shapes
from vertebra.engine.config import TrainConfig
from vertebra.engine.train import Trainer


def anchor_sizes(mult: float, levels) -> list[list[int]]:
    return [[int(round(mult * 2**lvl * 2 ** (k / 3))) for k in range(3)] for lvl in levels]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/shapes", help="shapes set (generated there if absent)")
    p.add_argument("--out", default="runs/bench_shapes_retinanet")
    p.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    p.add_argument("--eval-every", type=float, default=3.0, help="minutes of training between evaluations")
    p.add_argument("--val-limit", type=int, default=None, help="evaluate the curve on the first N val images")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--progressive", default="128:0.6,192:0.8", metavar="SIZE:UNTIL,...",
                   help="progressive resizing over the time budget ('none': all at --size)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--fpn-channels", type=int, default=128)
    p.add_argument("--head-convs", type=int, default=2)
    p.add_argument("--head-norm", default="gn", choices=("gn", "none"))
    p.add_argument("--max-level", type=int, default=6)
    p.add_argument("--anchor-mult", type=float, default=1.5, help="anchor base size = mult x stride")
    p.add_argument("--matcher", default="iou", choices=("iou", "atss"),
                   help="anchor assignment: the paper's IoU 0.5 / 0.4 rule or ATSS")
    p.add_argument("--box-loss", default="l1", choices=("l1", "giou"))
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    progressive = [] if args.progressive == "none" else _progressive(args.progressive)
    root = ensure_shapes(Path(args.data))
    levels = range(3, args.max_level + 1)
    det_kw = {"fpn_channels": args.fpn_channels, "max_level": args.max_level,
              "anchor_sizes": anchor_sizes(args.anchor_mult, levels), "detections_per_img": 100,
              "head_norm": None if args.head_norm == "none" else "gn", "matcher": args.matcher,
              "box_loss": args.box_loss, "head_convs": args.head_convs}
    cfg = TrainConfig(task="det", source=DataSource(data=str(root)), size=args.size, backbone="resnet18",
                      detector_kwargs=det_kw, channels_last=True, epochs=100, batch=args.batch, lr=args.lr,
                      optimizer="adamw", weight_decay=0.05, schedule="cosine", schedule_on_time=True,
                      progressive=progressive,
                      warmup_steps=args.warmup, amp=None if args.no_amp else "bf16", ema=args.ema,
                      augment="flip", out=args.out, max_minutes=args.minutes, eval_every=10**6,
                      eval_every_minutes=args.eval_every, log_every=10, workers=args.workers, seed=args.seed,
                      threads=args.threads, progress=True)
    load0 = os.getloadavg()
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch threads "
          f"{args.threads or torch.get_num_threads()}; load average at start {load0[0]:.1f} / {load0[1]:.1f} / "
          f"{load0[2]:.1f}")
    trainer = Trainer(cfg)
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
    imgs = summary["steps"] * args.batch
    result = {
        "final": {k: final[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP_agnostic", "AP50_agnostic")},
        "final_per_class": {k: v for k, v in final.items() if "/" in k},
        "curve_minutes_ap50": curve,
        "train_minutes": trainer.train_seconds / 60, "wall_minutes": wall / 60, "steps": summary["steps"],
        "images_seen": imgs, "images_per_s": imgs / max(trainer.train_seconds, 1e-9),
        "epochs": summary["epochs"], "load_start": load0, "load_end": load1,
        "threads": args.threads or torch.get_num_threads(), "size": args.size, "recipe": vars(args),
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
