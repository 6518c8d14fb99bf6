"""``vertebra data shapes``: write the built-in synthetic detection set. ``vertebra data stats``: what a detection
set's boxes look like to the detector (sizes, aspect ratios, objects per image at the input size) and how well
anchors cover them (the share of boxes whose best anchor reaches IoU 0.5, per pyramid level), for the paper's
anchors and for the anchors fitted to the set (what ``vertebra train``'s preset uses)."""

from __future__ import annotations

import argparse
import time

from . import _args as A
from ._console import console, print_error

__all__ = ["register", "cmd_shapes", "cmd_stats", "data_stats"]


def cmd_shapes(args: argparse.Namespace) -> int:
    from ..data.shapes import write_shapes

    t0 = time.perf_counter()
    try:
        out = write_shapes(args.out, args.train, args.val, args.size, args.seed, overwrite=args.overwrite)
    except FileExistsError as e:
        print_error(e)
        return 2
    console.print(f"wrote {args.train} train + {args.val} val images ({args.size} px, seed {args.seed}) to {out} "
                  f"in {time.perf_counter() - t0:.1f} s", markup=False, highlight=False)
    return 0


def data_stats(dataset, size: int, limit: int | None = 2000, seed: int = 0) -> dict:
    """The statistics ``vertebra data stats`` prints, as a dict: ``boxes`` (sizes, aspect ratios, objects per image
    at the input ``size``), ``coco_area`` (the share of small / medium / large boxes by COCO's area rule, in the
    image's own pixels), ``per_class`` box counts, ``paper`` and ``fitted`` (anchor coverage at IoU 0.5 and the
    level each box's best anchor is on) on a seeded sample of ``limit`` images."""
    import numpy as np

    from ..detection.anchors import anchor_coverage, box_sample, box_statistics, default_anchor_sizes, fit_anchors

    sample = box_sample(dataset.records, size, limit=limit, seed=seed)
    stats = box_statistics(sample)
    areas = np.concatenate([(r.boxes[:, 2] - r.boxes[:, 0]) * (r.boxes[:, 3] - r.boxes[:, 1])
                            for r in dataset.records if len(r.boxes)] or [np.zeros(0)])
    n = max(len(areas), 1)
    medium = (areas >= 32**2) & (areas < 96**2)
    coco_area = {"small": float((areas < 32**2).sum() / n), "medium": float(medium.sum() / n),
                 "large": float((areas >= 96**2).sum() / n)}
    labels = np.concatenate([r.labels for r in dataset.records] or [np.zeros(0, dtype=np.int64)])
    per_class = {name: int((labels == i).sum()) for i, name in enumerate(dataset.categories)}
    levels = list(range(3, 8))
    paper = anchor_coverage(sample, default_anchor_sizes(levels), levels)
    fit = fit_anchors(sample, min_level=(2, 3))
    return {"name": getattr(dataset, "name", ""), "images": len(dataset.records), "size": size, "boxes": stats,
            "coco_area": coco_area, "per_class": per_class, "paper": paper, "fitted": fit.to_dict(),
            "fitted_describe": fit.describe()}


def _stats_plot(dataset, size: int, st: dict, path) -> None:
    """Box sizes at the input scale (histogram, log scale) with the paper's and the fitted anchor sizes."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write
    from ..detection.anchors import box_sample, default_anchor_sizes

    b = box_sample(dataset.records, size, limit=2000).all_boxes()
    sizes = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).clamp(min=1e-6).sqrt().numpy()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(sizes):
        lo, hi = max(float(sizes.min()), 0.5), float(sizes.max()) * 1.05
        bins = [lo * (hi / lo) ** (i / 40) for i in range(41)]
        ax.hist(sizes, bins=bins, color="tab:blue", alpha=0.7, label="boxes (sqrt of area)")
    for group, color, label in ((default_anchor_sizes(range(3, 8)), "tab:red", "paper anchors (4 x stride, P3-P7)"),
                                (st["fitted"]["anchor_sizes"], "tab:green", "fitted anchors")):
        for i, s in enumerate(v for lvl in group for v in lvl):
            ax.axvline(s, color=color, lw=1, alpha=0.7, label=label if i == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel(f"box size at the input size {size} px (px, log scale)")
    ax.set_ylabel("boxes")
    ax.set_title(f"{st['name']}: {st['boxes']['boxes']} boxes of {st['boxes']['images']} images; anchors cover "
                 f"{100 * st['paper']['covered']:.0f}% (paper) / {100 * st['fitted']['covered']:.0f}% (fitted)"
                 if not math.isnan(st["paper"]["covered"]) else st["name"], fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def cmd_stats(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rich.table import Table

    from ..data import DataError
    from ..data.sources import DataSource, open_detection

    try:
        source = DataSource(data=args.data, coco_ann=args.coco_ann, coco_images=args.coco_images, voc=args.voc,
                            voc_train_split=args.voc_split or "trainval", voc_val_split=args.voc_split or "test")
        if source.kind is None:
            from ..data.sources import ensure_shapes

            source = DataSource(data=str(ensure_shapes()))
        train, val, _ = open_detection(source, args.size, skip_bad=args.skip_bad)
        ds = val if args.split == "val" else train
        if ds is None:
            raise ValueError("the data has no validation split (use --split train)")
        st = data_stats(ds, args.size, limit=args.images, seed=args.seed)
    except (DataError, FileNotFoundError, ValueError) as e:
        print_error(e)
        return 2
    plain = dict(markup=False, highlight=False)
    b = st["boxes"]
    console.print(f"{st['name']}: {st['images']} images, {sum(st['per_class'].values())} boxes of "
                  f"{len(st['per_class'])} classes; box statistics on {b['images']} images at the input size "
                  f"{args.size} px (shorter side)", **plain)
    t = Table(header_style="bold", title="boxes")
    for col in ("", "p5", "p25", "median", "p75", "p95"):
        t.add_column(col, justify="left" if not col else "right")
    for key, label, fmt in (("size", "size (sqrt area, px)", "{:.1f}"), ("aspect", "aspect (h / w)", "{:.2f}"),
                            ("per_image", "objects per image", "{:.1f}")):
        q = b[key]
        t.add_row(label, *(fmt.format(q[k]) for k in ("p5", "p25", "p50", "p75", "p95")))
    console.print(t)
    pi, ca = b["per_image"], st["coco_area"]
    console.print(f"objects per image: mean {pi['mean']:.2f}, max {pi['max']}; by COCO's area rule (own pixels): "
                  f"small {100 * ca['small']:.1f}%, medium {100 * ca['medium']:.1f}%, large {100 * ca['large']:.1f}%",
                  **plain)
    console.print("boxes per class: " + ", ".join(f"{k} {v}" for k, v in st["per_class"].items()), **plain)
    f = st["fitted"]
    t = Table(header_style="bold", title="anchors (3 scales x 3 aspect ratios per level): share of boxes whose "
                                         "best anchor is on each level")
    t.add_column("anchors", justify="left")
    levels = [f"P{lvl}" for lvl in range(min(3, f["min_level"]), 8)]
    for lvl in levels:
        t.add_column(lvl, justify="right")
    t.add_column("uncovered at IoU 0.5", justify="right")
    for label, cov in (("paper: 4 x stride, P3-P7", st["paper"]),
                       (f"fitted: {f['mult']:g} x stride, P{f['min_level']}-P{f['max_level']}", f)):
        t.add_row(label, *(f"{100 * cov['per_level'][k]:.1f}%" if k in cov["per_level"] else "-" for k in levels),
                  f"{100 * (1 - cov['covered']):.1f}%")
    console.print(t)
    console.print(f"fitted anchor sizes: {f['anchor_sizes']} (vertebra train's preset fits them the same way)",
                  **plain)
    if args.json:
        from .._io import atomic_write

        atomic_write(Path(args.json), json.dumps(st, indent=1) + "\n")
        console.print(f"wrote {args.json}", **plain)
    if args.plot:
        _stats_plot(ds, args.size, st, Path(args.plot))
        console.print(f"wrote {args.plot}", **plain)
    return 0


def register(subparsers) -> None:
    """Add ``data`` and its subcommand ``shapes``."""
    from ..data import shapes
    from ..data.shapes import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_SIZE

    data = subparsers.add_parser("data", help="data sets: write the built-in shapes set, look at a set's boxes")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("shapes", help="write the built-in synthetic detection set (COCO JSON + JPEGs)",
                       description=(shapes.__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (must not exist, be empty, or be a shapes set "
                                                "with --overwrite)")
    p.add_argument("--train", type=A.POSITIVE_INT, default=DEFAULT_NUM_TRAIN,
                   help=f"training images (default {DEFAULT_NUM_TRAIN})")
    p.add_argument("--val", type=A.COUNT, default=DEFAULT_NUM_VAL,
                   help=f"validation images (default {DEFAULT_NUM_VAL})")
    p.add_argument("--size", type=A.integer(32), default=DEFAULT_SIZE,
                   help=f"image side in px (default {DEFAULT_SIZE})")
    p.add_argument("--seed", type=A.SEED, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shapes set in --out")
    p.set_defaults(handler=cmd_shapes)

    q = sub.add_parser("stats", help="box sizes, aspect ratios, objects per image and anchor coverage of a "
                                     "detection set", description=(__doc__ or "").split("\n\n")[0])
    g = q.add_argument_group("data (one source; none: the built-in shapes set)")
    g.add_argument("--data", metavar="DIR", type=A.existing_dir, help="a shapes set or a COCO-2017 layout folder")
    g.add_argument("--coco", dest="coco_ann", metavar="ANN", type=A.existing_file,
                   help="a COCO annotation file (with --images)")
    g.add_argument("--images", dest="coco_images", metavar="DIR", type=A.existing_dir,
                   help="the image folder of --coco")
    g.add_argument("--voc", metavar="ROOT", type=A.existing_dir, help="a Pascal VOC year folder")
    g.add_argument("--voc-split", default=None, help="the VOC split (default trainval; test with --split val)")
    g.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed annotations")
    q.add_argument("--split", choices=("train", "val"), default="train", help="which split of the source")
    q.add_argument("--size", type=A.SIZE, default=256,
                   help="the detector's input size (shorter side) the boxes are measured at (default 256)")
    q.add_argument("--sample", dest="images", type=A.POSITIVE_INT, default=2000, metavar="N",
                   help="box and anchor statistics on a seeded sample of N images (default 2000)")
    q.add_argument("--seed", type=A.SEED, default=0, help="the sample's seed (default 0)")
    q.add_argument("--json", metavar="FILE", default=None, help="also write the statistics as JSON")
    q.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw the box sizes with the paper's and the fitted anchor sizes")
    q.set_defaults(handler=cmd_stats, _check=_check_stats, _parser=q)


def _check_stats(args) -> None:
    if args.coco_ann is not None and args.coco_images is None:
        raise A.UsageError("--coco", "give the image folder with --images")
    if sum(x is not None for x in (args.data, args.coco_ann, args.voc)) > 1:
        raise A.UsageError("--data", "give one of --data, --coco, --voc")
