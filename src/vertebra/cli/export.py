"""``vertebra export``: a backbone, a trained checkpoint or a RetinaNet to ONNX and/or torch.export."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..export.backbone import DEFAULT_OPSET
from . import _args as A

__all__ = ["register", "cmd_export"]


def register(subparsers) -> None:
    """Add ``vertebra export`` to the CLI's sub-parsers."""
    sp = subparsers.add_parser(
        "export", help="export a backbone or a trained checkpoint to ONNX and/or torch.export (.pt2)",
        description="Export a registered backbone (classifier or --features-only), a trained checkpoint "
                    "(classifier or RetinaNet) or, with --detector retinanet, a RetinaNet on a backbone. "
                    "RetinaNet exports with decoding and NMS; a JSON sidecar describes its preprocessing.")
    sp.add_argument("target", help="a registered backbone name or a vertebra checkpoint (.safetensors)")
    sp.add_argument("--out", help="output path without or with suffix (default: ./<name>)")
    sp.add_argument("--format", default="onnx", choices=["onnx", "pt2", "both"], help="default onnx")
    sp.add_argument("--opset", type=A.integer(17), default=DEFAULT_OPSET,
                    help=f"ONNX opset (17 or newer, default {DEFAULT_OPSET})")
    sp.add_argument("--input", dest="size", action=A.Renamed, new="--size", type=A.SIZE)
    sp.add_argument("--size", type=A.SIZE, help="square input size (backbones: default the paper's; RetinaNet: the "
                                              "canvas size, default its min_size rounded up to the pad multiple)")
    sp.add_argument("--batch", type=A.POSITIVE_INT, default=1, help="batch of the example input (default 1)")
    sp.add_argument("--dynamic-batch", action="store_true", help="leave the batch axis dynamic")
    sp.add_argument("--dynamic-size", action="store_true", help="leave height and width dynamic (backbones)")
    sp.add_argument("--features-only", action="store_true", help="export the feature extractor")
    sp.add_argument("--out-strides", type=A.POSITIVE_INT, nargs="+", help="feature strides (with --features-only)")
    sp.add_argument("--num-classes", type=A.POSITIVE_INT, help="classes (default: the paper's; 91 for --detector)")
    sp.add_argument("--weights", type=A.file_or_url, help="backbone weights (vertebra, torchvision or timm state_dict)")
    sp.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="TAG",
                    help="the backbone's published weights (its best, or TAG; vertebra weights list NAME); the "
                         "sidecar gets their mean / std")
    sp.add_argument("--detector", choices=["retinanet"], help="export a detector on the named backbone")
    sp.add_argument("--check", action="store_true", help="run the export against PyTorch (onnxruntime / the "
                                                         "ExportedProgram); fail above the tolerance")
    sp.add_argument("--rtol", type=A.NON_NEGATIVE, default=1e-4, help="--check: allowed difference relative to the "
                                                             "output scale (default 1e-4)")
    sp.add_argument("--atol", type=A.NON_NEGATIVE, default=1e-5, help="--check: absolute allowance (default 1e-5)")
    sp.set_defaults(handler=cmd_export, _check=check_export, _parser=sp)


def check_export(args) -> None:
    """--size against the network's smallest input (a registered backbone; a checkpoint and a detector's canvas are
    checked by the export itself)."""
    if args.detector is None and not args.target.endswith(".safetensors"):
        A.check_size_for(args.target, {"--size": args.size})


def _print(msg: str) -> None:
    print(msg, flush=True)


def _retinanet_plan(model, args, info):
    """(exporters by format, checkers by format, check inputs, sidecar) for a RetinaNet."""
    from .. import export as E

    d = int(model.transform.size_divisible)
    size = args.size if args.size is not None else int(math.ceil(model.transform.min_size[-1] / d) * d)
    if size % d:
        raise ValueError(f"--size {size}: the RetinaNet canvas must be a multiple of {d}")
    if args.dynamic_size:
        raise ValueError("--dynamic-size: a RetinaNet export has a fixed canvas (its anchors are constants); "
                         "choose the canvas with --size")
    batch, sizes, _ = E.sample_detection_batch(size, n=max(2, args.batch))
    exporters = {
        "onnx": lambda path: E.export_retinanet_onnx(model, path, size, batch=args.batch, opset=args.opset,
                                                     dynamic_batch=True),
        "pt2": lambda path: E.export_retinanet_program(model, path, size, batch=args.batch),
    }
    checkers = {
        "onnx": lambda path: E.check_retinanet_onnx(model, path, batch, sizes, rtol=args.rtol,
                                                    atol=max(args.atol, 1e-4)),
        "pt2": lambda path: E.check_retinanet_program(model, path, batch, sizes, rtol=args.rtol,
                                                      atol=max(args.atol, 1e-4)),
    }
    what = f"canvas {size}x{size}"
    return exporters, checkers, what, E.retinanet_sidecar(model, size, info.get("categories"))


def _backbone_plan(model, args, info, name):
    from .. import export as E

    example = E.example_input(model, args.size, args.batch)
    inputs = E.sample_inputs(example, args.dynamic_batch, args.dynamic_size, getattr(model, "min_input_size", 1))
    dyn = dict(dynamic_batch=args.dynamic_batch, dynamic_size=args.dynamic_size)
    exporters = {
        "onnx": lambda path: E.export_onnx(model, path, example, opset=args.opset, **dyn),
        "pt2": lambda path: E.export_program(model, path, example, **dyn),
    }
    checkers = {
        "onnx": lambda path: E.check_onnx(model, path, inputs, rtol=args.rtol, atol=args.atol),
        "pt2": lambda path: E.check_program(model, path, inputs, rtol=args.rtol, atol=args.atol),
    }
    spec = getattr(model, "spec", None)
    sidecar = {"format": "vertebra-backbone-export", "version": 1, "name": name, "source": info["source"],
               "features_only": bool(getattr(model, "features_only", False)),
               "outputs": E.output_names(model), "input": list(example.shape[1:]),
               "dynamic_batch": args.dynamic_batch, "dynamic_size": args.dynamic_size,
               # a checkpoint's recorded normalisation first (it is what the weights were trained with)
               "mean": info.get("mean") or (list(spec.mean) if spec is not None else None),
               "std": info.get("std") or (list(spec.std) if spec is not None else None),
               "num_classes": getattr(model, "num_classes", None), "categories": info.get("categories")}
    return exporters, checkers, f"input {tuple(example.shape)}", sidecar


def cmd_export(args) -> int:
    from .._io import atomic_write
    from ..detection.retinanet import RetinaNet
    from ..export import load_for_export

    model, info = load_for_export(args.target, num_classes=args.num_classes, features_only=args.features_only,
                                  out_strides=args.out_strides, weights=args.weights, detector=args.detector,
                                  pretrained=args.pretrained)
    name = getattr(model, "name", Path(args.target).stem)
    base = Path(args.out) if args.out else Path(name)
    if base.suffix in (".onnx", ".pt2"):
        base = base.with_suffix("")
    if isinstance(model, RetinaNet):
        exporters, checkers, what, sidecar = _retinanet_plan(model, args, info)
        what += ", dynamic batch"
    else:
        exporters, checkers, what, sidecar = _backbone_plan(model, args, info, name)
    ok = True
    for fmt in ["onnx", "pt2"] if args.format == "both" else [args.format]:
        t0 = time.perf_counter()
        path = base.with_suffix(f".{fmt}")
        data = exporters[fmt](path)
        size = f"{len(data) / 1e6:.1f} MB, opset {args.opset}" if fmt == "onnx" else "ExportedProgram"
        _print(f"wrote {path} ({size}, {what}) in {time.perf_counter() - t0:.1f} s")
        if args.check:
            res = checkers[fmt](path)
            _print(f"check {fmt}: {res}")
            ok &= res.ok
    side = base.with_suffix(".json")
    atomic_write(side, json.dumps(sidecar, indent=1) + "\n")
    _print(f"wrote {side} (preprocessing: mean, std, input size, categories)")
    return 0 if ok else 1
