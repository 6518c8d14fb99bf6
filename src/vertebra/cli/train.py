"""``vertebra train``, ``vertebra eval`` and ``vertebra predict``. The parsers' dests are the names of the
:class:`~vertebra.engine.config.TrainConfig` and :class:`~vertebra.data.sources.DataSource` fields, so the
config is built from them by name (:func:`config_from_args`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from . import _args as A
from ._console import console, print_error

__all__ = ["register", "config_from_args", "cmd_train", "cmd_eval", "cmd_predict", "predict_images",
           "pretrained_detector"]

EXIT_ERROR = 2
EXIT_NONFINITE = 3
_DTYPE = dict(choices=("fp32", "bf16", "fp16", "auto"), default=None, metavar="{fp32,bf16,fp16,auto}",
              help="precision of the network (mixed, autocast): bf16 on a CPU with bf16 convolutions, fp16 on CUDA "
                   "(with GradScaler), auto the faster of the two for the device, fp32 (the default) none")


def _add_dtype(p) -> None:
    p.add_argument("--dtype", **_DTYPE)
    p.add_argument("--amp", dest="dtype", action=A.Renamed, new="--dtype", nargs="?", const="auto",
                   choices=("auto", "bf16", "fp16"))


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except ValueError:
        return k.strip(), v


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
    last = 0.0
    for size, until in out:
        if size < 16:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: each SIZE must be an integer >= 16, got {size}")
        if not (last < until <= 1.0 and math.isfinite(until)):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: each UNTIL must be a fraction in (0, 1] "
                                             f"larger than the one before, got {until:g}")
        last = until
    return out


def _device(arg: str | None) -> str:
    from ..devices import default_device

    return default_device() if arg is None else arg


def _add_data_args(p: argparse.ArgumentParser, *, for_eval: bool = False) -> None:
    g = p.add_argument_group("data (one source; none: the built-in shapes set" +
                             (", or the checkpoint's own data)" if for_eval else ")"))
    g.add_argument("--data", metavar="DIR", type=A.existing_dir,
                   help="a shapes set or a COCO-2017 layout folder (annotations/instances_{train,val}*.json, "
                        "train*/, val*/)")
    g.add_argument("--coco", dest="coco_ann", metavar="ANN", type=A.existing_file,
                   help="a COCO annotation file (with --images)")
    g.add_argument("--images", dest="coco_images", metavar="DIR", type=A.existing_dir,
                   help="the image folder of --coco")
    if not for_eval:
        g.add_argument("--val-coco", dest="val_coco_ann", metavar="ANN", type=A.existing_file,
                       help="validation annotation file (with --val-images)")
        g.add_argument("--val-images", dest="val_coco_images", metavar="DIR", type=A.existing_dir,
                       help="validation image folder (default --images)")
    g.add_argument("--voc", metavar="ROOT", type=A.existing_dir, help="a Pascal VOC year folder (VOCdevkit/VOC2007)")
    if for_eval:
        g.add_argument("--split", dest="voc_split", default=None,
                       help="VOC split to evaluate (default: the run's val split, test)")
    else:
        g.add_argument("--voc-train-split", default="trainval", help="VOC training split (default trainval)")
        g.add_argument("--voc-val-split", default="test", help="VOC validation split (default test)")
    g.add_argument("--folder", metavar="DIR", type=A.existing_dir,
                   help="an image folder for classification (DIR/train, DIR/val or DIR/<class>/)")
    g.add_argument("--cifar", metavar="DIR", type=A.existing_dir,
                   help="CIFAR-10/100 python batches for classification")
    g.add_argument("--skip-bad", action="store_true", help="skip (and count) bad images and annotations")
    g.add_argument("--workers", type=A.COUNT, default=0, help="data-loading processes (default 0)")
    g.add_argument("--batch", type=A.POSITIVE_INT, default=None,
                   help="images per batch (per process under torchrun; default 8, cls 32)")


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a RetinaNet (det) or a classifier (cls)",
                              description="Train a RetinaNet on any backbone (--task det, default) or a backbone "
                                          "as classifier (--task cls). With no data it uses the built-in shapes set.")
    p.add_argument("--task", choices=("det", "cls"), default=None, help="det (default) or cls "
                                                                        "(default with --folder/--cifar)")
    _add_data_args(p)
    p.add_argument("--size", type=A.SIZE, default=None,
                   help="input size (det: shorter side, default 256; cls: crop, default 224, 32 for CIFAR); at "
                        "least the backbone's smallest input")
    p.add_argument("--augment", choices=("none", "flip", "full"), default="flip",
                   help="flip: horizontal flips; full: flips and colour jitter (default flip)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="resnet18", help="a registered network (vertebra list; default resnet18)")
    m.add_argument("--backbone-weights", metavar="PATH", type=A.file_or_url,
                   help="backbone weights: a file or URL (ours, torchvision's, timm's)")
    m.add_argument("--pretrained", nargs="?", const="default", default=None, metavar="TAG",
                   help="fine-tune the backbone's published weights (its best, or the set TAG names, e.g. "
                        "timm:a1_in1k; vertebra weights list NAME): frozen BatchNorm, the first stages frozen, "
                        "the weights' normalisation. Without it (or --backbone-weights) the backbone trains from "
                        "scratch")
    m.add_argument("--scratch", action="store_true",
                   help="train the backbone from random init even where it has published weights (without "
                        "--scratch, --pretrained or --backbone-weights a network with published weights fine-tunes "
                        "them: cached, or downloaded; offline or without them it trains from scratch and says so)")
    m.add_argument("--backbone-kw", dest="backbone_kwargs", type=_kv, action="append", default=[],
                   metavar="KEY=VALUE", help="backbone argument, e.g. aux_logits=true (repeatable)")
    m.add_argument("--detector-kw", dest="detector_kwargs", type=_kv, action="append", default=[],
                   metavar="KEY=VALUE", help="RetinaNet argument, e.g. head_norm=gn, fpn_channels=128, "
                                             "anchor_sizes=[[16],[32],[64],[128],[256]] (repeatable)")
    m.add_argument("--head-convs", type=A.COUNT, default=None,
                   help="convs per RetinaNet head tower (default 4; the same as --detector-kw head_convs=N)")
    m.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    o = p.add_argument_group("optimisation (the preset chooses what is not given)")
    o.add_argument("--preset", choices=("auto", "scratch", "finetune", "none"), default="auto",
                   help="the recipe: scratch (from random init: AdamW 2e-3, warm-up, cosine, EMA, progressive "
                        "resizing, a light RetinaNet with GroupNorm heads, anchors fitted to the training boxes, "
                        "bf16 on CPUs that compute in it, channels_last), finetune (the same on a backbone with "
                        "weights: AdamW 5e-4, one size), auto (finetune when the backbone starts from weights, else "
                        "scratch), none (the engine's plain defaults: SGD, the paper's RetinaNet). Every flag "
                        "given overrides the preset; config.json records what it set")
    o.add_argument("--epochs", type=A.POSITIVE_INT, default=12, help="training epochs (default 12)")
    o.add_argument("--lr", type=A.POSITIVE, default=None, help="base learning rate (default by optimizer: sgd 0.01, "
                                                          "adamw 1e-3, rmsprop 0.045*batch/32)")
    o.add_argument("--optimizer", choices=("sgd", "adamw", "rmsprop"), default="sgd", help="the optimizer")
    o.add_argument("--weight-decay", type=A.NON_NEGATIVE, default=None,
                   help="default by optimizer: sgd 1e-4, adamw 0.05, rmsprop 4e-5")
    o.add_argument("--schedule", choices=("cosine", "step", "inception", "constant"), default="cosine",
                   help="inception: x0.94 every two epochs (also step with rmsprop and no --step-epochs)")
    o.add_argument("--warmup", dest="warmup_steps", type=A.COUNT, default=None, metavar="STEPS",
                   help="linear warm-up steps (default min(500, total/10))")
    o.add_argument("--progressive", type=_progressive, default=[], metavar="SIZE:UNTIL,...",
                   help="progressive resizing: train at SIZE until the fraction UNTIL of the schedule (of "
                        "--max-minutes with --schedule-on-time, else of the steps), then the next; the rest at "
                        "--size. E.g. 128:0.5,192:0.75")
    o.add_argument("--step-epochs", type=A.POSITIVE_INT, nargs="*", default=[],
                   help="step schedule: epochs where lr x0.1")
    _add_dtype(o)
    o.add_argument("--ema", nargs="?", type=A.FRACTION, const=0.9998, default=None, metavar="DECAY",
                   help="evaluate a running average of the weights (default decay 0.9998)")
    o.add_argument("--clip", nargs="?", type=A.POSITIVE, const=2.0, default=None, metavar="NORM",
                   help="clip the gradients' global norm (default 2.0)")
    o.add_argument("--label-smoothing", nargs="?", type=A.FRACTION, const=0.1, default=0.0, metavar="EPS",
                   help="classification label smoothing (default 0.1 when given)")
    o.add_argument("--aux-weight", type=A.NON_NEGATIVE, default=None, help="auxiliary classifier loss weight "
                                                                  "(GoogLeNet 0.3, Inception-v3 0.4)")
    r = p.add_argument_group("run")
    r.add_argument("--config", metavar="JSON", type=A.existing_file,
                   help="replay a run's settings (its config.json, or a checkpoint's .json); any flag given on top "
                        "overrides them")
    r.add_argument("--device", type=A.device, default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    r.add_argument("--out", default=None, help="run folder (default runs/NAME)")
    r.add_argument("--name", default=None, help="run name (default <task>_<backbone>)")
    r.add_argument("--exist-ok", action="store_true",
                   help="write into a run folder that holds a run (without it a new run never overwrites one: the "
                        "default folder becomes NAME-2, NAME-3 ..., a given --out is refused)")
    r.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT", type=A.existing_file,
                   help="continue the run in --out (its last.safetensors) or from CHECKPOINT")
    r.add_argument("--max-minutes", type=A.POSITIVE, default=None, help="stop after this much training time")
    r.add_argument("--schedule-on-time", action="store_true",
                   help="with --max-minutes: the lr schedule and --progressive run over the time budget, not "
                        "the epochs")
    r.add_argument("--max-steps", type=A.POSITIVE_INT, default=None, help="stop after this many optimizer steps")
    r.add_argument("--eval-every", type=A.POSITIVE_INT, default=1, metavar="EPOCHS",
                   help="evaluate every N epochs (default 1)")
    r.add_argument("--eval-every-minutes", type=A.POSITIVE, default=None, metavar="MINUTES",
                   help="also evaluate after this much training time")
    r.add_argument("--val-limit", type=A.POSITIVE_INT, default=None, metavar="N",
                   help="evaluate on the first N validation images (default all)")
    r.add_argument("--no-eval", dest="final_eval", action="store_false",
                   help="a run stopped by --max-minutes, --max-steps or Ctrl-C ends without its final evaluation")
    r.add_argument("--save-every", type=A.POSITIVE_INT, default=None, metavar="STEPS",
                   help="also write last.safetensors every N steps")
    r.add_argument("--seed", type=A.SEED, default=0, help="random seed (default 0)")
    r.add_argument("--threads", type=A.POSITIVE_INT, default=None, help="torch CPU threads")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    d = p.add_argument_group("several processes and machines (launch with torchrun --nproc_per_node N ... "
                             "-m vertebra train; --batch is per process)")
    d.add_argument("--accum-steps", type=A.POSITIVE_INT, default=1, metavar="N",
                   help="accumulate N micro-batches of --batch per optimizer step (default 1)")
    d.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over every process's batch")
    d.add_argument("--lr-scale", choices=("none", "linear"), default="none",
                   help="linear: lr x global batch / --lr-ref-batch, global batch = --batch x processes x "
                        "--accum-steps (default none: --lr as given)")
    d.add_argument("--lr-ref-batch", type=A.POSITIVE_INT, default=None, metavar="B",
                   help="the batch --lr is meant for (default --batch: one process, no accumulation)")
    d.add_argument("--dist-backend", choices=("gloo", "nccl"), default=None,
                   help="default gloo on CPU, nccl on CUDA")
    d.add_argument("--dist-timeout", type=A.POSITIVE, default=30.0, metavar="MINUTES",
                   help="how long a process waits for a peer before the job stops (default 30)")
    p.set_defaults(handler=cmd_train, _check=check_train, _parser=p, _explicit_wanted=True)


def register(subparsers) -> None:
    """Add ``train``, ``eval`` and ``predict`` to the ``vertebra`` command's sub-parsers."""
    _add_train_parser(subparsers)

    e = subparsers.add_parser("eval", help="evaluate a checkpoint (COCO AP / VOC mAP / top-1, top-5)",
                              description="Evaluate a checkpoint on its validation data or on the data given.")
    e.add_argument("--checkpoint", required=True, metavar="C", type=A.existing_file,
                   help="a checkpoint of vertebra train")
    _add_data_args(e, for_eval=True)
    e.add_argument("--device", type=A.device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    e.add_argument("--size", type=A.SIZE, default=None, help="input size (default: the training size)")
    _add_dtype(e)
    e.add_argument("--no-ema", action="store_true", help="use the raw weights, not the running average")
    e.add_argument("--voc-metric", action="store_true", help="also Pascal VOC07/VOC12 mAP@0.5")
    e.add_argument("--per-class", action="store_true",
                   help="detection: also AP and AP50 of each class and the class-agnostic AP / AP50")
    e.add_argument("--out", default=None, metavar="JSON", help="metrics file (default <checkpoint>.eval.json)")
    e.set_defaults(handler=cmd_eval, _check=check_eval, _parser=e)

    q = subparsers.add_parser("predict", help="detect (or classify) images with a checkpoint or a COCO RetinaNet",
                              description="Write each image with its boxes drawn and a JSON of the detections "
                                          "(label, category name, score, box), by a trained checkpoint or by "
                                          "a COCO-trained RetinaNet (--pretrained coco, no checkpoint needed).")
    q.add_argument("images", nargs="+", metavar="SOURCE",
                   help="image files, folders of them, glob patterns ('photos/*.jpg'), or video files (with PyAV)")
    w = q.add_mutually_exclusive_group(required=True)
    w.add_argument("--checkpoint", metavar="C", type=A.existing_file, help="a checkpoint of vertebra train")
    w.add_argument("--pretrained", nargs="?", const="coco", default=None, metavar="WEIGHTS",
                   help="a RetinaNet with published weights: coco (the default) takes the best COCO-trained set "
                        "for --backbone, a name such as retinanet_resnet50_fpn:COCO_V1 one set "
                        "(vertebra weights list shows them)")
    q.add_argument("--backbone", default="resnet50", help="the backbone of --pretrained (default resnet50)")
    q.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default predictions/)")
    q.add_argument("--save-txt", action="store_true",
                   help="also labels/<stem>.txt per image in the YOLO format (label cx cy w h score, normalised)")
    q.add_argument("--score-thresh", type=A.PROBABILITY, default=0.3,
                   help="keep detections scoring at least this (default 0.3)")
    q.add_argument("--device", type=A.device, default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    q.add_argument("--no-ema", action="store_true", help="use the raw weights, not the running average")
    q.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the network in bfloat16 (about twice as fast on CPUs with bf16 instructions; scores "
                        "agree with float32 to about 2 decimals, boxes and NMS stay float32)")
    q.add_argument("--bf16", dest="dtype", action=A.Renamed, new="--dtype", nargs=0, const="bf16")
    q.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="torch: the PyTorch model made for inference (BatchNorm folded, fused, channels_last); "
                        "onnxruntime: the model exported to ONNX and run by onnxruntime (CPU, float32; checked "
                        "against PyTorch when it is built; a detector sees each image fit into a square canvas of "
                        "its training size; needs pip install vertebra[onnx])")
    q.set_defaults(handler=cmd_predict, _check=check_predict, _parser=q)


def _fields(cls, args) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _source(args, **defaults):
    from ..data.sources import DataSource

    return DataSource(**{**defaults, **{k: v for k, v in _fields(DataSource, args).items() if v is not None}})


# --------------------------------------------------------------------------------------------- train


def config_defaults(path: str) -> dict[str, Any]:
    """The ``vertebra train`` parser defaults that replay the run described by ``path`` (a run's ``config.json``,
    or a checkpoint's ``.json`` sidecar, whose ``config`` entry it is): every TrainConfig field by its flag's dest,
    the data source's fields flattened, the key-value flags as their pairs. Raises ValueError naming the file."""
    from ..engine.config import TrainConfig

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a run's config.json ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict):  # a checkpoint's sidecar
        raw = raw["config"]
    if not isinstance(raw, dict) or "backbone" not in raw:
        raise ValueError(f"{path}: not a run's config.json (no 'backbone')")
    import dataclasses as dc

    names = {f.name for f in dc.fields(TrainConfig)}
    try:
        cfg = TrainConfig.from_dict({k: v for k, v in raw.items() if k in names or k == "source"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    out = {k: v for k, v in dc.asdict(cfg).items() if k not in ("source", "amp", "backbone_kwargs",
                                                                 "detector_kwargs", "out", "name")}
    out.update({k: v for k, v in cfg.source.to_dict().items()})
    out["dtype"] = cfg.amp
    out["backbone_kwargs"] = list(cfg.backbone_kwargs.items())
    out["detector_kwargs"] = list(cfg.detector_kwargs.items())
    return out


def check_train(args) -> None:
    """The flags of ``vertebra train`` that must fit together, checked before any data is read: one data source,
    the precision the device runs, sizes the backbone takes (not on --resume: the run's own backbone decides)."""
    try:
        _ = _source(args).kind
    except ValueError as e:
        raise A.UsageError("--data", str(e)) from None
    if args.pretrained is not None and args.backbone_weights is not None:
        raise A.UsageError("--pretrained", "give --pretrained (published weights) or --backbone-weights (a file), "
                                           "not both")
    if args.scratch and (args.pretrained is not None or args.backbone_weights is not None):
        raise A.UsageError("--scratch", "trains from random init: leave out --pretrained / --backbone-weights")
    if args.preset == "finetune" and args.scratch:
        raise A.UsageError("--preset", "finetune is the recipe of a backbone with weights; --scratch has none "
                                       "(use --preset scratch)")
    if args.schedule_on_time and args.max_minutes is None:
        raise A.UsageError("--schedule-on-time", "the schedule runs over the time budget: give --max-minutes too")
    if args.dtype is not None:
        from ..precision import resolve_amp

        device = _device(args.device)
        A.check_precision(resolve_amp(args.dtype, device), device, f"--dtype {args.dtype}")
    if not args.resume:
        sizes = {"--size": args.size}
        if args.progressive:
            sizes["--progressive"] = int(min(size for size, _ in args.progressive))
        A.check_size_for(args.backbone, sizes, dict(args.backbone_kwargs))


def check_eval(args) -> None:
    if args.size is not None:  # against the checkpoint's backbone (its description; the handler reports a bad file)
        from ..engine.checkpoint import CheckpointError, load_checkpoint

        try:
            model = load_checkpoint(args.checkpoint, prefixes=()).state["model"]
        except CheckpointError:
            model = None
        if isinstance(model, dict) and isinstance(model.get("backbone"), str):
            A.check_size_for(model["backbone"], {"--size": args.size}, model.get("backbone_kwargs") or {})
    if args.dtype is not None:
        from ..precision import resolve_amp

        device = _device(args.device)
        A.check_precision(resolve_amp(args.dtype, device), device, f"--dtype {args.dtype}")


def check_predict(args) -> None:
    if args.dtype == "bf16":
        A.check_precision("bf16", _device(args.device), "--dtype bf16")
    if args.backend == "onnxruntime":
        if args.dtype != "fp32":
            raise A.UsageError("--backend", "onnxruntime runs the float32 graph: leave out --dtype bf16")
        if args.device is not None and not args.device.startswith("cpu"):
            raise A.UsageError("--backend", f"onnxruntime runs on the CPU here, not on {args.device}")
        from ..export.runtime import require_onnxruntime

        try:
            require_onnxruntime()
        except ImportError as e:
            raise A.UsageError("--backend", str(e)) from None


#: flag dests that fill another TrainConfig field
_DEST_FIELDS = {"dtype": "amp", "head_convs": "detector_kwargs"}


def default_weights(backbone: str, progress: bool = True) -> tuple[str | None, str]:
    """How a run with no --pretrained, --backbone-weights or --scratch starts: ``("default", why)`` where the
    network has published weights that are cached or can be downloaded now, else ``(None, why)`` (from scratch)."""
    from ..hub import WeightsError, _offline, download, get_weights, has_weights, is_cached

    if not has_weights(backbone):
        return None, f"{backbone} has no published weights: training from scratch"
    w = get_weights(backbone, "default")
    if not is_cached(w):
        try:
            download(w, progress=progress)
        except WeightsError as e:
            why = "VERTEBRA_OFFLINE is set" if _offline() else str(e.__cause__ or e).split("\n")[0][:160]
            return None, (f"{backbone}'s published weights {w.tag} are not in the cache and could not be fetched "
                          f"({why}): training from scratch (--scratch says so and stops trying; `vertebra weights "
                          f"download {backbone}` fetches them)")
    return "default", (f"{backbone}: fine-tuning its published weights {w.tag} (--scratch trains from random "
                       "init)")


def config_from_args(args, *, notes: list[str] | None = None):
    """The :class:`TrainConfig` of parsed ``vertebra train`` arguments, with the preset applied under the flags
    given (``args._explicit``; all of them where it is absent). Where the backbone's start was chosen for the user
    the reason is appended to ``notes``."""
    from ..engine.config import TrainConfig
    from ..engine.presets import apply_preset
    from ..engine.tasks import default_task, task_for
    from ..precision import resolve_amp

    source = _source(args)
    task = args.task or default_task(source)
    device = _device(args.device)
    values = _fields(TrainConfig, args)
    detector_kwargs = dict(args.detector_kwargs)
    if args.head_convs is not None:
        detector_kwargs["head_convs"] = args.head_convs
    values.update(task=task, source=source, device=device, amp=resolve_amp(args.dtype, device),
                  batch=task_for(task).default_batch if args.batch is None else args.batch,
                  backbone_kwargs=dict(args.backbone_kwargs),
                  detector_kwargs=detector_kwargs, step_epochs=list(args.step_epochs),
                  progressive=list(args.progressive))
    if (task == "det" and not args.resume and not getattr(args, "scratch", False) and args.pretrained is None
            and args.backbone_weights is None and args.preset != "scratch" and not values.get("preset_values")):
        values["pretrained"], why = default_weights(args.backbone)
        if notes is not None:
            notes.append(why)
    cfg = TrainConfig(**values)
    given = getattr(args, "_explicit", None)
    if given is None:  # not parsed by vertebra's main: every field differing from the defaults counts as given
        return apply_preset(cfg)
    return apply_preset(cfg, {_DEST_FIELDS.get(d, d) for d in given})


def _where() -> str:
    """Which process failed, in a job of several."""
    from ..engine.distributed import rank_label

    label = rank_label()
    return f" ({label})" if label else ""


def cmd_train(args) -> int:
    from .._io import DISK_FULL_ERRNOS, RunLockedError
    from ..data import DataError
    from ..engine.checkpoint import CheckpointError
    from ..engine.distributed import cleanup_distributed, is_main_process
    from ..engine.train import NonFiniteLossError, Trainer
    from ..hub import WeightsError

    trainer = None
    try:
        notes: list[str] = []
        cfg = config_from_args(args, notes=notes)
        for line in notes:
            console.print(line, markup=False, highlight=False)
        trainer = Trainer(cfg, resume=args.resume, console=console)
        c, plan = trainer.cfg, trainer.plan
        if is_main_process():
            console.print(f"run folder {trainer.run_dir}: {trainer.model_spec.backbone} ({c.task}), "
                          f"{len(trainer.train_set)} training images"
                          + (f", {len(trainer.val_set)} validation" if trainer.val_set is not None else "")
                          + (f", resumed at step {trainer.step}" if args.resume else ""))
            if plan.world_size > 1 or plan.accum_steps > 1:
                console.print(f"{plan.world_size} process(es) on {trainer.device.type}: global batch "
                              f"{plan.global_batch} = --batch {plan.batch} x {plan.world_size} x --accum-steps "
                              f"{plan.accum_steps}; lr {plan.lr:g} (--lr-scale {c.lr_scale})"
                              + (", SyncBatchNorm" if c.sync_bn and plan.world_size > 1 else ""))
        summary = trainer.fit()
    except NonFiniteLossError as e:
        print_error(e, label=f"error{_where()}")
        return EXIT_NONFINITE
    except (CheckpointError, DataError, WeightsError, FileNotFoundError, ValueError, KeyError, RunLockedError) as e:
        print_error(e.args[0] if isinstance(e, KeyError) and e.args else e, label=f"error{_where()}")
        return EXIT_ERROR
    except Exception as e:  # a crash: say which process, then let the traceback (and torchrun's report) follow
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:  # metrics.csv, loss.png, config.json: one line
            last = f"; the last complete checkpoint is {trainer.run_dir / 'last.safetensors'}" if trainer else ""
            print_error(f"{e}{last}", label=f"error{_where()}")
            return EXIT_ERROR
        if _where():
            print_error(f"{type(e).__name__}: {e}", label=f"failed{_where()}")
        raise
    finally:
        if trainer is not None:
            trainer.close()
        cleanup_distributed()
    if summary.get("last_eval") and trainer.main:
        _print_metrics(summary["last_eval"], f"final evaluation ({trainer.run_dir})")
    return 0


# --------------------------------------------------------------------------------------------- eval


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    from rich.table import Table

    t = Table(title=title, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and "/" not in k:
            t.add_row(k, f"{v:.4f}")
    console.print(t)


def _print_per_class(metrics: dict[str, Any]) -> None:
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
    from .._io import atomic_write
    from ..data import DataError
    from ..data.sources import DataSource
    from ..engine import load_model
    from ..engine.checkpoint import CheckpointError
    from ..engine.evaluate import eval_process_group, evaluate_dataset
    from ..engine.tasks import ModelSpec, task_for
    from ..precision import resolve_amp

    try:
        # under torchrun: each rank evaluates every W-th image; every rank gets the metrics of the whole set
        with eval_process_group(_device(args.device)) as dist_info:
            device = str(dist_info.device)
            model, state = load_model(args.checkpoint, ema=not args.no_ema, device=device)
            spec = ModelSpec.from_dict(state["model"])
            task = task_for(spec.task)
            run = DataSource.from_dict(state.get("config") or {})
            source = run.for_eval(_source(args, voc_val_split=run.voc_val_split))
            size = args.size if args.size is not None else spec.size or 256
            ds, is_voc = task.eval_dataset(spec, source, size, voc_split=args.voc_split, skip_bad=args.skip_bad)
            metrics = evaluate_dataset(task, model, ds, device=device,
                                       batch_size=8 if args.batch is None else args.batch,
                                       num_workers=args.workers, amp=resolve_amp(args.dtype, device),
                                       voc=is_voc or args.voc_metric, breakdown=args.per_class)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        print_error(e)
        return EXIT_ERROR
    if dist_info.rank != 0:  # rank 0 prints and writes
        return 0
    metrics["images"] = len(ds)
    _print_metrics(metrics, f"{args.checkpoint} on {getattr(ds, 'name', getattr(ds, 'root', ''))}")
    if any(k.startswith("AP50/") for k in metrics):
        _print_per_class(metrics)
    skipped = getattr(ds, "skipped", None)
    if skipped:
        console.print(f"skipped {sum(skipped.values())}: {dict(skipped)}")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    atomic_write(out, json.dumps({"checkpoint": str(args.checkpoint), "metrics": metrics}, indent=1) + "\n")
    console.print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------- predict


def predict_images(model, state: dict[str, Any], paths: list[str], out_dir: Path, score_thresh: float = 0.3,
                   device: str = "cpu", skipped: list[dict[str, str]] | None = None,
                   save_txt: bool = False) -> list[dict[str, Any]]:
    """Run a checkpoint's model on image (and video) files. Writes into ``out_dir``: ``<stem>.json`` per image (a
    video: one JSON with a ``frames`` list, frame numbers from 0), for a detector ``<stem>.jpg`` with the boxes drawn
    (a video: ``<stem>/<frame>.jpg``), ``predictions.json`` with every entry, and with ``save_txt`` YOLO labels
    ``labels/<stem>.txt`` (``label cx cy w h score``, normalised). Returns the entries. An image that cannot be read
    raises its :class:`~vertebra.data.ImageError`, or, given a ``skipped`` list, is appended to it (image, reason,
    error) and left out."""
    import torch

    from .._io import atomic_write
    from ..data import ImageError, is_video, read_image, read_video_frames
    from ..engine.tasks import ModelSpec, task_for

    spec = ModelSpec.from_dict(state["model"])
    task = task_for(spec.task)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, stems = [], set()

    def unique(stem: str) -> str:  # a.png and a.jpg of one folder: a and a-2, neither overwritten
        name = next(n for n in (stem, *(f"{stem}-{k}" for k in range(2, len(paths) + 2))) if n not in stems)
        stems.add(name)
        return name

    def one(img: torch.Tensor, where: str, picture_path: Path, txt_path: Path) -> dict[str, Any]:
        entry: dict[str, Any] = {"image": where, "height": int(img.shape[1]), "width": int(img.shape[2])}
        entry.update(task.predict(model, spec, img, device=device, score_thresh=score_thresh))
        picture = task.render(img, entry)
        if picture is not None:
            picture_path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(picture_path, quality=92)
            entry["output"] = str(picture_path)
        if save_txt and "detections" in entry:
            h, w = entry["height"], entry["width"]
            lines = [f"{d['label']} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                     f"{(b[3] - b[1]) / h:.6f} {d['score']:.4f}" for d in entry["detections"] for b in [d["bbox_xyxy"]]]
            atomic_write(txt_path, "".join(line + "\n" for line in lines))
        return entry

    for path in map(Path, paths):
        name = unique(path.stem)
        try:
            if is_video(path):
                frames = []
                for k, frame in read_video_frames(path):
                    e = one(frame, f"{path}#{k}", out_dir / name / f"{k:06d}.jpg",
                            out_dir / "labels" / name / f"{k:06d}.txt")
                    frames.append({"frame": k, **{x: v for x, v in e.items() if x != "image"}})
                entry = {"video": str(path), "frames": frames}
            else:
                img = read_image(path).as_subclass(torch.Tensor)
                entry = one(img, str(path), out_dir / f"{name}.jpg", out_dir / "labels" / f"{name}.txt")
        except ImageError as e:
            if skipped is None:
                raise
            skipped.append({"image": str(path), "reason": e.reason, "error": str(e)})
            continue
        atomic_write(out_dir / f"{name}.json", json.dumps(entry, indent=1) + "\n")
        results.append(entry)
    atomic_write(out_dir / "predictions.json", json.dumps(results, indent=1) + "\n")
    return results


def pretrained_detector(backbone: str, pretrained: str, device: str = "cpu"):
    """``(model, state)`` of a RetinaNet with published weights, ``state["model"]`` its ModelSpec (the
    weights' class names; a label is the COCO category id) as a checkpoint would hold it."""
    from ..detection import create_detector
    from ..engine.tasks import ModelSpec

    model = create_detector("retinanet", backbone=backbone, pretrained=pretrained).to(device)
    w = model.pretrained_weights
    spec = ModelSpec(task="det", backbone=backbone, num_classes=model.num_classes, categories=list(model.categories),
                     detector="retinanet", detector_kwargs={"pretrained": f"{w.network}:{w.tag}"},
                     size=model.transform.min_size[-1], mean=list(w.mean), std=list(w.std))
    return model, {"model": spec.to_dict()}


def cmd_predict(args) -> int:
    from collections import Counter

    import torch

    from ..data import DataError
    from ..engine import load_model
    from ..engine.checkpoint import CheckpointError
    from ..engine.tasks import ModelSpec, task_for
    from ..hub import WeightsError
    from ..inference import optimize_for_inference
    from .classify import find_images

    device = _device(args.device)
    skipped: list[dict[str, str]] = []
    try:
        paths, ignored = find_images(args.images, videos=True)
        if args.pretrained is not None:
            model, state = pretrained_detector(args.backbone, args.pretrained, device)
        else:
            model, state = load_model(args.checkpoint, ema=not args.no_ema, device=device)
        # BN folded, channels_last, fused conv + ReLU (outputs equal within float rounding); bf16 on request; or the
        # ONNX graph in onnxruntime (checked against PyTorch as it is built)
        if args.backend == "onnxruntime":
            device = "cpu"
            model = optimize_for_inference(model.cpu(), inplace=True, backend="onnxruntime")
        else:
            model = optimize_for_inference(model, inplace=True,
                                           dtype=torch.bfloat16 if args.dtype == "bf16" else None)
        results = predict_images(model, state, paths, Path(args.out), args.score_thresh, device, skipped=skipped,
                                 save_txt=args.save_txt)
    except (CheckpointError, DataError, WeightsError, FileNotFoundError, ValueError) as e:
        print_error(e)
        return EXIT_ERROR
    task = task_for(ModelSpec.from_dict(state["model"]).task)
    plain = dict(markup=False, highlight=False, soft_wrap=True)
    for r in results:
        if "frames" in r:
            n = sum(len(f.get("detections", ())) for f in r["frames"])
            console.print(f"{r['video']}: {len(r['frames'])} frames, {n} detections", **plain)
        else:
            console.print(f"{r['image']}: {task.summary_line(r)}", **plain)
    for s in skipped:
        print_error(s["error"], label="skipped")
    if ignored:
        shown = ", ".join(p.name for p in ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        console.print(f"left out {len(ignored)} file(s) of the folders that are not images ({shown})", **plain)
    if skipped:
        reasons = ", ".join(f"{k}: {v}" for k, v in Counter(s["reason"] for s in skipped).most_common())
        console.print(f"skipped {len(skipped)} of {len(paths)} images ({reasons})", **plain)
    if not results:
        print_error(f"none of the {len(paths)} images could be read; nothing written but an empty "
                    f"{Path(args.out) / 'predictions.json'}")
        return EXIT_ERROR
    console.print(f"wrote {Path(args.out) / 'predictions.json'} ({len(results)} images)", **plain)
    return 0
