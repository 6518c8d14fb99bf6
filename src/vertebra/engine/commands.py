"""``vertebra train``, ``vertebra eval`` and ``vertebra predict``: ``register_commands(subparsers)`` adds them
to the ``vertebra`` command's sub-parsers (each sets ``func=<callable(args) -> exit code>``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register_commands", "cmd_train", "cmd_eval", "cmd_predict", "build_eval_dataset", "predict_images"]

EXIT_ERROR = 2
EXIT_NONFINITE = 3


def _console(stderr: bool = False):
    from rich.console import Console

    f = sys.stderr if stderr else sys.stdout
    return Console(file=f, width=None if f.isatty() else 160)


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except ValueError:
        return k.strip(), v


def _add_data_args(p: argparse.ArgumentParser, *, for_eval: bool = False) -> None:
    g = p.add_argument_group("data (one source; none: the built-in shapes set" +
                             (", or the checkpoint's own data)" if for_eval else ")"))
    g.add_argument("--data", metavar="DIR", help="a shapes set or a COCO-2017 layout folder "
                                                 "(annotations/instances_{train,val}*.json, train*/, val*/)")
    g.add_argument("--coco", metavar="ANN", help="a COCO annotation file (with --images)")
    g.add_argument("--images", metavar="DIR", help="the image folder of --coco")
    if not for_eval:
        g.add_argument("--val-coco", metavar="ANN", help="validation annotation file (with --val-images)")
        g.add_argument("--val-images", metavar="DIR", help="validation image folder (default --images)")
    g.add_argument("--voc", metavar="ROOT", help="a Pascal VOC year folder (VOCdevkit/VOC2007)")
    if for_eval:
        g.add_argument("--split", default=None, help="VOC split to evaluate (default: the run's val split, test)")
    else:
        g.add_argument("--voc-train-split", default="trainval")
        g.add_argument("--voc-val-split", default="test")
    g.add_argument("--folder", metavar="DIR", help="an image folder for classification (DIR/train, DIR/val or "
                                                   "DIR/<class>/)")
    g.add_argument("--cifar", metavar="DIR", help="CIFAR-10/100 python batches for classification")
    g.add_argument("--skip-bad", action="store_true", help="skip (and count) bad images and annotations")
    g.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    g.add_argument("--batch", type=int, default=None, help="images per batch (per process under torchrun)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _progressive(text: str) -> list[list[float]]:
    """``128:0.5,192:0.75`` -> [[128, 0.5], [192, 0.75]] (argparse type of ``--progressive``)."""
    out = []
    for part in text.split(","):
        size, sep, until = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            out.append([int(size), float(until)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected SIZE:UNTIL pairs like 128:0.5,192:0.75, got {part!r}") \
                from None
    return out


def _device(arg: str | None) -> str:
    if arg:
        return arg
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def register_commands(subparsers: Any) -> None:
    """Add ``train``, ``eval`` and ``predict`` to an argparse sub-parser set."""
    # ---------------------------------------------------------------- train
    p = subparsers.add_parser("train", help="train a RetinaNet (det) or a classifier (cls)",
                              description="Train a RetinaNet on any backbone (--task det, default) or a backbone "
                                          "as classifier (--task cls). With no data it uses the built-in shapes set.")
    p.add_argument("--task", choices=("det", "cls"), default=None, help="det (default) or cls "
                                                                        "(default with --folder/--cifar)")
    _add_data_args(p)
    p.add_argument("--size", type=int, default=None, help="input size (det: shorter side, default 256; cls: "
                                                          "crop, default 224, 32 for CIFAR)")
    p.add_argument("--augment", choices=("none", "flip", "full"), default="flip")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="resnet18")
    m.add_argument("--backbone-weights", metavar="PATH", help="pretrained backbone weights (ours, torchvision, timm)")
    m.add_argument("--backbone-kw", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="backbone argument, e.g. aux_logits=true (repeatable)")
    m.add_argument("--detector-kw", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="RetinaNet argument, e.g. head_norm=gn, fpn_channels=128, "
                        "anchor_sizes=[[16],[32],[64],[128],[256]] (repeatable)")
    m.add_argument("--head-convs", type=int, default=None, help="convs per RetinaNet head tower (default 4)")
    m.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=12)
    o.add_argument("--lr", type=float, default=None, help="base learning rate (default by optimizer: sgd 0.01, "
                                                          "adamw 1e-3, rmsprop 0.045*batch/32)")
    o.add_argument("--optimizer", choices=("sgd", "adamw", "rmsprop"), default="sgd")
    o.add_argument("--weight-decay", type=float, default=None)
    o.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    o.add_argument("--warmup", type=int, default=None, metavar="STEPS", help="linear warm-up steps "
                                                                             "(default min(500, total/10))")
    o.add_argument("--progressive", type=_progressive, default=[], metavar="SIZE:UNTIL,...",
                   help="progressive resizing: train at SIZE until the fraction UNTIL of the schedule (of "
                        "--max-minutes with --schedule-on-time, else of the steps), then the next; the rest at "
                        "--size. E.g. 128:0.5,192:0.75")
    o.add_argument("--step-epochs", type=int, nargs="*", default=[], help="step schedule: epochs where lr x0.1")
    o.add_argument("--amp", nargs="?", const="auto", choices=("auto", "bf16", "fp16"), default=None,
                   help="mixed precision: bf16 on CPU, fp16 (GradScaler) on CUDA, or as given")
    o.add_argument("--ema", nargs="?", type=float, const=0.9998, default=None, metavar="DECAY",
                   help="evaluate a running average of the weights (default decay 0.9998)")
    o.add_argument("--clip", nargs="?", type=float, const=2.0, default=None, metavar="NORM",
                   help="clip the gradients' global norm (default 2.0)")
    o.add_argument("--label-smoothing", nargs="?", type=float, const=0.1, default=0.0, metavar="EPS",
                   help="classification label smoothing (default 0.1 when given)")
    o.add_argument("--aux-weight", type=float, default=None, help="auxiliary classifier loss weight "
                                                                  "(GoogLeNet 0.3, Inception-v3 0.4)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="run folder (default runs/NAME)")
    r.add_argument("--name", default=None, help="run name (default <task>_<backbone>)")
    r.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue the run in --out (its last.safetensors) or from CHECKPOINT")
    r.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    r.add_argument("--schedule-on-time", action="store_true",
                   help="with --max-minutes: the lr schedule and --progressive run over the time budget, not "
                        "the epochs")
    r.add_argument("--max-steps", type=int, default=None)
    r.add_argument("--eval-every", type=int, default=1, metavar="EPOCHS")
    r.add_argument("--eval-every-minutes", type=float, default=None)
    r.add_argument("--save-every", type=int, default=None, metavar="STEPS")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("several processes and machines (launch with torchrun --nproc_per_node N ... "
                             "-m vertebra train; --batch is per process)")
    d.add_argument("--accum-steps", type=int, default=1, metavar="N",
                   help="accumulate N micro-batches of --batch per optimizer step (default 1)")
    d.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over every process's batch")
    d.add_argument("--lr-scale", choices=("none", "linear"), default="none",
                   help="linear: lr x global batch / --lr-ref-batch, global batch = --batch x processes x "
                        "--accum-steps (default none: --lr as given)")
    d.add_argument("--lr-ref-batch", type=int, default=None, metavar="B",
                   help="the batch --lr is meant for (default --batch: one process, no accumulation)")
    d.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                   help="default gloo on CPU, nccl on CUDA")
    d.add_argument("--dist-timeout", type=float, default=30.0, metavar="MINUTES",
                   help="how long a process waits for a peer before the job stops (default 30)")
    p.set_defaults(func=cmd_train)

    # ---------------------------------------------------------------- eval
    e = subparsers.add_parser("eval", help="evaluate a checkpoint (COCO AP / VOC mAP / top-1, top-5)",
                              description="Evaluate a checkpoint on its validation data or on the data given.")
    e.add_argument("--checkpoint", required=True, metavar="C")
    _add_data_args(e, for_eval=True)
    e.add_argument("--size", type=int, default=None, help="input size (default: the training size)")
    e.add_argument("--amp", nargs="?", const="auto", choices=("auto", "bf16", "fp16"), default=None)
    e.add_argument("--no-ema", action="store_true", help="use the raw weights, not the running average")
    e.add_argument("--voc-metric", action="store_true", help="also Pascal VOC07/VOC12 mAP@0.5")
    e.add_argument("--per-class", action="store_true",
                   help="detection: also AP and AP50 of each class and the class-agnostic AP / AP50")
    e.add_argument("--out", default=None, metavar="JSON", help="metrics file (default <checkpoint>.eval.json)")
    e.set_defaults(func=cmd_eval)

    # ---------------------------------------------------------------- predict
    q = subparsers.add_parser("predict", help="detect (or classify) images with a checkpoint",
                              description="Write each image with its boxes drawn and a JSON of the detections.")
    q.add_argument("images", nargs="+", metavar="IMAGE")
    q.add_argument("--checkpoint", required=True, metavar="C")
    q.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default predictions/)")
    q.add_argument("--score-thresh", type=float, default=0.3)
    q.add_argument("--device", default=None)
    q.add_argument("--no-ema", action="store_true")
    q.add_argument("--bf16", action="store_true",
                   help="run the network in bfloat16 (about twice as fast on CPUs with bf16 instructions; scores "
                        "agree with float32 to about 2 decimals, boxes and NMS stay float32)")
    q.set_defaults(func=cmd_predict)


# --------------------------------------------------------------------------------------------- train


def config_from_args(args) -> Any:
    from .config import TrainConfig

    task = args.task or ("cls" if (args.folder or args.cifar) else "det")
    amp = args.amp
    device = _device(args.device)
    if amp == "auto":
        amp = "fp16" if device.startswith("cuda") else "bf16"
    return TrainConfig(
        task=task, data=args.data, coco_ann=args.coco, coco_images=args.images, val_coco_ann=args.val_coco,
        val_coco_images=args.val_images, voc=args.voc, voc_train_split=args.voc_train_split,
        voc_val_split=args.voc_val_split, folder=args.folder, cifar=args.cifar, skip_bad=args.skip_bad,
        workers=args.workers, size=args.size, augment=args.augment, backbone=args.backbone,
        backbone_weights=args.backbone_weights, backbone_kwargs=dict(args.backbone_kw),
        detector_kwargs=dict(args.detector_kw), head_convs=args.head_convs, channels_last=args.channels_last,
        epochs=args.epochs, batch=args.batch or (8 if task == "det" else 64), lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup,
        step_epochs=list(args.step_epochs), progressive=list(args.progressive), clip=args.clip, amp=amp, ema=args.ema,
        label_smoothing=args.label_smoothing, aux_weight=args.aux_weight, out=args.out, name=args.name,
        device=device, seed=args.seed, eval_every=args.eval_every, eval_every_minutes=args.eval_every_minutes,
        save_every=args.save_every, max_minutes=args.max_minutes,
        schedule_on_time=args.schedule_on_time, max_steps=args.max_steps,
        progress=not args.no_progress, threads=args.threads, accum_steps=args.accum_steps, sync_bn=args.sync_bn,
        lr_scale=args.lr_scale, lr_ref_batch=args.lr_ref_batch, dist_backend=args.dist_backend,
        dist_timeout=args.dist_timeout,
    )


def cmd_train(args) -> int:
    from ..data import DataError
    from .checkpoint import CheckpointError
    from .distributed import cleanup_distributed, is_main_process, rank_label
    from .train import NonFiniteLossError, Trainer

    console, err = _console(), _console(stderr=True)

    def where() -> str:  # which process failed, in a job of several
        label = rank_label()
        return f" ({label})" if label else ""

    trainer = None
    try:
        cfg = config_from_args(args)
        trainer = Trainer(cfg, resume=args.resume, console=console)
        c = trainer.cfg
        if is_main_process():
            console.print(f"run folder {trainer.run_dir}: {trainer.spec['backbone']} ({c.task}), "
                          f"{len(trainer.train_set)} training images"
                          + (f", {len(trainer.val_set)} validation" if trainer.val_set is not None else "")
                          + (f", resumed at step {trainer.step}" if args.resume else ""))
            if c.world_size > 1 or c.accum_steps > 1:
                console.print(f"{c.world_size} process(es) on {trainer.device.type}: global batch {c.global_batch} "
                              f"= --batch {c.batch} x {c.world_size} x --accum-steps {c.accum_steps}; "
                              f"lr {c.scaled_lr:g} (--lr-scale {c.lr_scale})" + (", SyncBatchNorm" if c.sync_bn
                                                                                 and c.world_size > 1 else ""))
        summary = trainer.fit()
    except NonFiniteLossError as e:
        err.print(f"[red]error{where()}:[/] {e}")
        return EXIT_NONFINITE
    except (CheckpointError, DataError, FileNotFoundError, ValueError, KeyError) as e:
        err.print(f"[red]error{where()}:[/] {e}")
        return EXIT_ERROR
    except Exception as e:  # a crash: say which process, then let the traceback (and torchrun's report) follow
        if where():
            err.print(f"[red]failed{where()}:[/] {type(e).__name__}: {e}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
        cleanup_distributed()
    if summary.get("last_eval") and trainer.main:
        _print_metrics(console, summary["last_eval"], f"final evaluation ({trainer.run_dir})")
    return 0


# --------------------------------------------------------------------------------------------- eval


def build_eval_dataset(args, state: dict[str, Any]):
    """The dataset ``vertebra eval`` measures: the data given on the command line, else the run's validation
    split."""
    from ..data import CIFAR, CocoDetection, ImageFolder, VOCDetection
    from ..data.transforms import classification_transforms, detection_transforms
    from .train import _coco_layout, ensure_shapes

    spec = state["model"]
    cfg = dict(state.get("config") or {})
    size = args.size or spec.get("size") or 256
    if not any((args.data, args.coco, args.voc, args.folder, args.cifar)):
        args.data, args.coco, args.images = cfg.get("data"), cfg.get("val_coco_ann"), cfg.get("val_coco_images")
        args.voc, args.folder, args.cifar = cfg.get("voc"), cfg.get("folder"), cfg.get("cifar")
        if args.coco is None and cfg.get("coco_ann"):
            raise ValueError("the run had no validation set (--val-coco); give --coco ANN --images DIR")
        if args.coco and not args.images:
            args.images = cfg.get("coco_images")
    if spec["task"] == "det":
        t = detection_transforms(False, size)
        if args.voc:
            split = args.split or cfg.get("voc_val_split") or "test"
            classes = spec["categories"]
            return VOCDetection(args.voc, split, t, classes=classes, skip_bad=args.skip_bad), True
        if args.coco:
            if not args.images:
                raise ValueError("--coco ANN needs --images DIR")
            return CocoDetection(args.images, args.coco, t, skip_bad=args.skip_bad), False
        root = Path(args.data) if args.data else ensure_shapes()
        va = _coco_layout(root, "val")
        if va is None:
            raise FileNotFoundError(f"{root}: no validation split (annotations/instances_val*.json + val*/)")
        return CocoDetection(va[0], va[1], t, skip_bad=args.skip_bad), False
    t = classification_transforms(False, size, mean=spec.get("mean"), std=spec.get("std"))
    if args.cifar:
        return CIFAR(args.cifar, False, t), False
    if not args.folder:
        raise ValueError("classification checkpoints evaluate on --folder DIR or --cifar DIR")
    root = Path(args.folder)
    root = root / "val" if (root / "val").is_dir() else root
    return ImageFolder(root, t, classes=spec["categories"], skip_bad=args.skip_bad), False


def _print_metrics(console, metrics: dict[str, Any], title: str) -> None:
    from rich.table import Table

    t = Table(title=title, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and "/" not in k:
            t.add_row(k, f"{v:.4f}")
    console.print(t)


def _print_per_class(console, metrics: dict[str, Any]) -> None:
    """The ``AP/<class>`` and ``AP50/<class>`` entries of ``metrics`` as one table, a row per class."""
    from rich.table import Table

    t = Table(title="per class", header_style="bold")
    for col in ("class", "AP", "AP50"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for k, v in metrics.items():
        if k.startswith("AP50/"):
            name = k[len("AP50/"):]
            t.add_row(name, f"{metrics.get('AP/' + name, float('nan')):.4f}", f"{v:.4f}")
    console.print(t)


def cmd_eval(args) -> int:
    from torch.utils.data import DataLoader

    from ..data import DataError, collate_classification, collate_detection
    from .checkpoint import CheckpointError, atomic_write_text
    from .evaluate import evaluate_classifier, evaluate_detector
    from .models import load_model

    console, err = _console(), _console(stderr=True)
    device = _device(args.device)
    amp = args.amp
    if amp == "auto":
        amp = "fp16" if device.startswith("cuda") else "bf16"
    try:
        model, state = load_model(args.checkpoint, ema=not args.no_ema, device=device)
        ds, is_voc = build_eval_dataset(args, state)
        spec = state["model"]
        if spec["task"] == "det" and list(ds.categories) != list(spec["categories"]):
            raise ValueError(f"the data's classes {ds.categories} differ from the checkpoint's {spec['categories']}")
        batch = args.batch or 8
        if spec["task"] == "det":
            loader = DataLoader(ds, batch_size=batch, num_workers=args.workers, collate_fn=collate_detection)
            metrics = evaluate_detector(model, loader, ds, device, amp, voc=is_voc or args.voc_metric,
                                        breakdown=args.per_class)
        else:
            loader = DataLoader(ds, batch_size=batch, num_workers=args.workers, collate_fn=collate_classification)
            metrics = evaluate_classifier(model, loader, device, amp)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        err.print(f"[red]error:[/] {e}")
        return EXIT_ERROR
    metrics["images"] = len(ds)
    _print_metrics(console, metrics, f"{args.checkpoint} on {getattr(ds, 'name', getattr(ds, 'root', ''))}")
    if any(k.startswith("AP50/") for k in metrics):
        _print_per_class(console, metrics)
    skipped = getattr(ds, "skipped", None)
    if skipped:
        console.print(f"skipped {sum(skipped.values())}: {dict(skipped)}")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"checkpoint": str(args.checkpoint), "metrics": metrics}, indent=1) + "\n")
    console.print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------- predict

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def predict_images(model, state: dict[str, Any], paths: list[str], out_dir: Path, score_thresh: float = 0.3,
                   device: str = "cpu") -> list[dict[str, Any]]:
    """Run a checkpoint's model on image files; writes ``<stem>.jpg`` with the boxes drawn per image and
    ``predictions.json``; returns the JSON entries."""
    import torch
    from PIL import Image, ImageDraw

    from ..data import read_image
    from ..data.transforms import classification_transforms
    from .checkpoint import atomic_write_text

    spec = state["model"]
    cats = spec["categories"]
    l2c = {int(k): v for k, v in (spec.get("label_to_category_id") or {}).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in paths:
        img = read_image(path).as_subclass(torch.Tensor)
        entry: dict[str, Any] = {"image": str(path), "height": int(img.shape[1]), "width": int(img.shape[2])}
        with torch.no_grad():
            if spec["task"] == "det":
                det = model([img.to(device)])[0]
                keep = det["scores"] >= score_thresh
                boxes, scores, labels = det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()
                entry["detections"] = [
                    {"bbox_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(lab),
                     "category": cats[int(lab)], "category_id": l2c.get(int(lab), int(lab))}
                    for b, s, lab in zip(boxes, scores, labels)]
                pil = Image.fromarray((img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
                draw = ImageDraw.Draw(pil)
                for d in entry["detections"]:
                    col = _PALETTE[d["label"] % len(_PALETTE)]
                    x1, y1, x2, y2 = d["bbox_xyxy"]
                    draw.rectangle([x1, y1, x2, y2], outline=col, width=2)
                    text = f"{d['category']} {d['score']:.2f}"
                    tb = draw.textbbox((x1, y1), text)
                    ty = y1 - (tb[3] - tb[1]) - 2 if y1 > (tb[3] - tb[1]) + 2 else y1
                    draw.rectangle([x1, ty, x1 + tb[2] - tb[0] + 2, ty + tb[3] - tb[1] + 2], fill=col)
                    draw.text((x1 + 1, ty), text, fill=(0, 0, 0))
                dst = out_dir / f"{Path(path).stem}.jpg"
                pil.save(dst, quality=92)
                entry["output"] = str(dst)
            else:
                t = classification_transforms(False, spec.get("size") or 224, mean=spec.get("mean"),
                                              std=spec.get("std"))
                x = t(img)[None].to(device)
                p = torch.softmax(model(x).float(), 1)[0]
                top = p.topk(min(5, p.numel()))
                entry["top5"] = [{"label": int(i), "category": cats[int(i)], "score": round(float(s), 4)}
                                 for s, i in zip(top.values, top.indices)]
        results.append(entry)
    atomic_write_text(out_dir / "predictions.json", json.dumps(results, indent=1) + "\n")
    return results


def cmd_predict(args) -> int:
    import torch

    from ..data import DataError
    from ..inference import optimize_for_inference
    from .checkpoint import CheckpointError
    from .models import load_model

    console, err = _console(), _console(stderr=True)
    device = _device(args.device)
    try:
        model, state = load_model(args.checkpoint, ema=not args.no_ema, device=device)
        # BN folded, channels_last, fused conv + ReLU (outputs equal within float rounding); bf16 on request
        model = optimize_for_inference(model, inplace=True, dtype=torch.bfloat16 if args.bf16 else None)
        results = predict_images(model, state, args.images, Path(args.out), args.score_thresh, device)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        err.print(f"[red]error:[/] {e}")
        return EXIT_ERROR
    for r in results:
        if "detections" in r:
            console.print(f"{r['image']}: {len(r['detections'])} detections -> {r['output']}")
        else:
            best = r["top5"][0]
            console.print(f"{r['image']}: {best['category']} ({best['score']:.3f})")
    console.print(f"wrote {Path(args.out) / 'predictions.json'}")
    return 0
