"""``vertebra export``: a backbone, a trained checkpoint or a RetinaNet to ONNX and/or torch.export."""

from __future__ import annotations

from ..export import DEFAULT_OPSET, cmd_export

__all__ = ["register"]


def register(subparsers) -> None:
    """Add ``vertebra export`` to the CLI's sub-parsers."""
    sp = subparsers.add_parser(
        "export", help="export a backbone or a trained checkpoint to ONNX and/or torch.export (.pt2)",
        description="Export a registered backbone (classifier or --features-only), a trained checkpoint "
                    "(classifier or RetinaNet) or, with --detector retinanet, a RetinaNet on a backbone. "
                    "RetinaNet exports with decoding and NMS; a JSON sidecar describes its preprocessing.")
    sp.add_argument("target", help="a registered backbone name or a vertebra checkpoint (.safetensors)")
    sp.add_argument("--out", help="output path without or with suffix (default: ./<name>)")
    sp.add_argument("--format", default="onnx", choices=["onnx", "pt2", "both"])
    sp.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (17 or newer)")
    sp.add_argument("--input", type=int, help="square input size (backbones: default the paper's; RetinaNet: the "
                                              "canvas size, default its min_size rounded up to the pad multiple)")
    sp.add_argument("--batch", type=int, default=1, help="batch of the example input")
    sp.add_argument("--dynamic-batch", action="store_true", help="leave the batch axis dynamic")
    sp.add_argument("--dynamic-size", action="store_true", help="leave height and width dynamic (backbones)")
    sp.add_argument("--features-only", action="store_true", help="export the feature extractor")
    sp.add_argument("--out-strides", type=int, nargs="+", help="feature strides (with --features-only)")
    sp.add_argument("--num-classes", type=int, help="classes (default: the paper's; 91 for --detector)")
    sp.add_argument("--weights", help="backbone weights (vertebra, torchvision or timm state_dict)")
    sp.add_argument("--detector", choices=["retinanet"], help="export a detector on the named backbone")
    sp.add_argument("--check", action="store_true", help="run the export against PyTorch (onnxruntime / the "
                                                         "ExportedProgram); fail above the tolerance")
    sp.add_argument("--rtol", type=float, default=1e-4, help="--check: allowed difference relative to the "
                                                             "output scale (default 1e-4)")
    sp.add_argument("--atol", type=float, default=1e-5, help="--check: absolute allowance (default 1e-5)")
    sp.set_defaults(handler=cmd_export)
