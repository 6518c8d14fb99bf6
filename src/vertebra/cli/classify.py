"""``vertebra classify IMAGE... --backbone NAME [--pretrained [TAG]] [--weights PATH] [--topk 5]``: the top
classes of images, with their names and probabilities, from a backbone with published (or given) weights.

The images get the weights' own evaluation preprocessing (``data.transforms.weights_transforms``: resize to
``input_size / crop_pct`` with their interpolation, center crop, their mean / std), and the network runs
through ``optimize_for_inference``. A folder stands for the images in it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import _args as A
from ._console import console, print_error

__all__ = ["register", "cmd_classify", "classify_images", "find_images", "image_files"]

EXIT_ERROR = 2


def register(subparsers) -> None:
    p = subparsers.add_parser("classify", help="the top-5 ImageNet classes of images with a pretrained backbone",
                              description="Print the top classes (name, probability) of each image, by a backbone "
                                          "with its published weights (default) or a weights file.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of them")
    p.add_argument("--backbone", required=True, metavar="NAME", help="a registered network (vertebra list)")
    p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="TAG",
                   help="published weights (the default without --weights): the network's best, or the set TAG "
                        "names, e.g. timm:a1_in1k (vertebra weights list NAME shows them)")
    p.add_argument("--weights", metavar="PATH", type=A.file_or_url,
                   help="a checkpoint or torchvision/timm state_dict file instead; "
                        "preprocessed as the network's published weights (if any)")
    p.add_argument("--topk", type=A.POSITIVE_INT, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--device", type=A.device, default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.set_defaults(handler=cmd_classify)


def find_images(paths, videos: bool = False) -> tuple[list[Path], list[Path]]:
    """(image files, other files) of ``paths``: a file is taken as it is (it may still fail to decode), a folder
    gives its image files by extension, sorted, and the files it holds that are not images; a glob pattern
    (``photos/*.jpg``, ``**`` too) its matches. ``videos``: video files count as images. A path that does not exist,
    a pattern that matches nothing, or a folder with no image at all, raises
    :class:`vertebra.data.MissingImageError`."""
    import glob

    from ..data import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MissingImageError

    media = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if videos else ())
    out: list[Path] = []
    other: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file())
            found = [f for f in files if f.suffix.lower() in media]
            if not found:
                raise MissingImageError(f"{p}: a folder with no image files ({', '.join(media)})")
            out.extend(found)
            other.extend(f for f in files if f.suffix.lower() not in media)
        elif p.is_file():
            out.append(p)
        elif glob.has_magic(str(p)):  # a pattern the shell did not expand (quoted, or on Windows)
            matched = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matched:
                raise MissingImageError(f"{p}: no file matches the pattern")
            out.extend(m for m in matched if m.suffix.lower() in media)
            other.extend(m for m in matched if m.suffix.lower() not in media)
        else:
            raise MissingImageError(f"{p}: image file not found")
    return out, other


def image_files(paths) -> list[Path]:
    """The image files ``paths`` name (:func:`find_images` without the other files)."""
    return find_images(paths)[0]


def class_names(weights, num_classes: int) -> list[str]:
    """The class names of ``weights``' label set (``reference/<categories>_classes.txt``); ImageNet's for a
    1000-class model without an entry; else ``"class <i>"``."""
    from ..hub import TABLE_PATH, Weights, category_names

    if isinstance(weights, Weights) and weights.num_classes == num_classes:
        names = category_names(weights)
        if names is not None:
            return names
    elif num_classes == 1000:  # a 1000-class model without an entry: ImageNet's
        return (TABLE_PATH.parent / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()
    return [f"class {i}" for i in range(num_classes)]


def _preprocessing(model, name: str):
    """The weights entry whose preprocessing the images get: the model's own, else the network's default
    published set's, else the network's input size and mean / std with the common 0.875 crop."""
    from .. import hub
    from ..registry import backbone_spec

    w = getattr(model, "pretrained_weights", None)
    if w is None and hub.has_weights(name):
        w = hub.get_weights(name)
    if w is None:
        spec = backbone_spec(name)
        w = SimpleNamespace(input_size=spec.input_size, crop_pct=0.875, interpolation="bilinear", mean=spec.mean,
                            std=spec.std, categories=None)
    return w


def classify_images(model, weights, paths, *, topk: int = 5, device: str = "cpu") -> list[dict[str, Any]]:
    """``[{"image", "top": [{"label", "name", "prob"}, ...]}, ...]``: the ``topk`` classes of every image file,
    each preprocessed by :func:`vertebra.data.transforms.weights_transforms` of ``weights``."""
    import torch

    from ..data import read_image
    from ..data.transforms import weights_transforms

    transform = weights_transforms(weights)
    names = class_names(weights, int(model.num_classes))
    k = max(1, min(int(topk), len(names)))
    results = []
    for path in paths:
        x = transform(read_image(path, exif=True).as_subclass(torch.Tensor))
        with torch.inference_mode():
            prob = torch.softmax(model(x[None].to(device)).float(), 1)[0].cpu()
        top = prob.topk(k)
        results.append({"image": str(path), "top": [
            {"label": int(i), "name": names[int(i)], "prob": float(p)} for p, i in zip(top.values, top.indices)]})
    return results


def cmd_classify(args) -> int:
    from .. import hub
    from ..data import DataError
    from ..inference import optimize_for_inference
    from ..registry import create_backbone
    from .train import _device

    device = _device(args.device)
    try:
        if args.weights is not None and args.pretrained is not None:
            raise ValueError("give --pretrained or --weights, not both")
        paths = image_files(args.images)
        if args.weights is not None:
            model = create_backbone(args.backbone, weights=args.weights)
        else:
            model = create_backbone(args.backbone, pretrained=True if args.pretrained is None else args.pretrained)
        weights = _preprocessing(model, args.backbone)
        if model.num_classes < 1:
            raise ValueError(f"{args.backbone} has no classifier")
        model = optimize_for_inference(model.to(device), inplace=True)
        results = classify_images(model, weights, paths, topk=args.topk, device=device)
    except (DataError, hub.WeightsError, FileNotFoundError, ValueError, KeyError) as e:
        # KeyError: an unknown network, the registry's message
        print_error(e.args[0] if isinstance(e, KeyError) and e.args else e)
        return EXIT_ERROR
    source = getattr(weights, "tag", None) or args.weights or "its input normalisation"
    plain = dict(highlight=False, markup=False, soft_wrap=True)
    console.print(f"{args.backbone} ({source})", **plain)
    for r in results:
        console.print(r["image"], **plain)
        for rank, t in enumerate(r["top"], 1):
            console.print(f"  {rank}. {t['name']:<30} {t['prob']:.4f}  (label {t['label']})", **plain)
    return 0
