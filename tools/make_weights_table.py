"""Write ``src/vertebra/reference/weights.json``: every set of published weights of a vertebra network.

For each registered network, each of its twins (``BackboneSpec.references`` and the twins that need a
build argument of ours, ``reference.twins.TWIN_BUILD_KWARGS``) is looked up at its source:

- torchvision: the weight enum of the model (``torchvision.models.get_model_weights``): the download URL,
  the sha256 prefix its file name carries, the eval transform (resize, crop, interpolation, mean / std),
  the reported ImageNet-1K accuracy and the file size;
- timm: every pretrained tag of the architecture (``timm.list_pretrained("<arch>.*")``) whose model has the
  same tensors as the base architecture: its Hugging Face repo and file (or release URL), license,
  mean / std / input size / crop fraction / interpolation, and the top-1 / top-5 that timm's own
  ``results/results-imagenet.csv`` reports at that input size (``--timm-results``).

Then the COCO RetinaNets of torchvision (``retinanet_resnet50_fpn`` and ``_v2``) with the build arguments
that give their layout. Per network the default (what ``pretrained=True`` takes) is the entry with the
highest reported top-1 among those for the network's own class count under a license that allows
commercial use; ties go to torchvision.

Run after a torchvision or timm upgrade (both installed; nothing is downloaded but timm's CSV, which is
read from a checkout of github:huggingface/pytorch-image-models):

    .venv/bin/python tools/make_weights_table.py --timm-results PATH/results/results-imagenet.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import torch

import vertebra
from vertebra.backbone import count_params
from vertebra.hub import TABLE_PATH
from vertebra.reference.twins import TWIN_BUILD_KWARGS

TORCHVISION_LICENSE = "bsd-3-clause"  # torchvision's; the weights carry no license of their own
#: torchvision models built with ``transform_input=True`` when their weights are loaded: the network
#: re-normalises ImageNet-normalised input to (x - 0.5) / 0.5, i.e. the weights expect mean = std = 0.5
TRANSFORM_INPUT = {"googlenet", "inception_v3"}
#: torchvision's COCO RetinaNets: (torchvision name, our build arguments for its layout)
DETECTORS = {
    "retinanet_resnet50_fpn": {"backbone": "resnet50", "trainable_stages": 3, "frozen_bn": True},
    "retinanet_resnet50_fpn_v2": {"backbone": "resnet50", "trainable_stages": 3, "frozen_bn": False,
                                  "p6_from": "c5", "head_norm": "gn", "box_loss": "giou"},
}


def _interp(value) -> str:
    return str(getattr(value, "value", value)).lower()


def torchvision_rows(network: str, arch: str, build_kwargs: dict) -> list[dict]:
    import torchvision

    rows = []
    for w in torchvision.models.get_model_weights(arch):
        if not w.meta.get("categories"):  # vgg16 IMAGENET1K_FEATURES: the classifier holds no trained values
            print(f"  skip {arch} {w.name}: no classifier weights", file=sys.stderr)
            continue
        t = w.transforms.keywords
        crop = int(t.get("crop_size", 224))
        resize = int(t.get("resize_size", 256))
        mean = tuple(t.get("mean", vertebra.registry.IMAGENET_MEAN))
        std = tuple(t.get("std", vertebra.registry.IMAGENET_STD))
        if arch in TRANSFORM_INPUT:
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        acc = w.meta["_metrics"]["ImageNet-1K"]
        file_name = w.url.rsplit("/", 1)[-1]
        rows.append(dict(
            network=network, tag=f"torchvision:{w.name}", twin=f"torchvision:{arch}", url=w.url, file_name=file_name,
            sha256=Path(file_name).stem.rsplit("-", 1)[-1], license=TORCHVISION_LICENSE,
            num_classes=len(w.meta["categories"]), categories="imagenet", mean=list(mean), std=list(std),
            input_size=[3, crop, crop], crop_pct=round(crop / resize, 4),
            interpolation=_interp(t.get("interpolation", "bilinear")),
            metrics={"top1": acc["acc@1"], "top5": acc["acc@5"], "eval_size": crop},
            file_size_mb=w.meta.get("_file_size"), build_kwargs=build_kwargs, hf_hub_id=None,
            recipe=w.meta.get("recipe")))
    return rows


def read_timm_results(path: Path | None) -> dict[tuple[str, int], dict]:
    if path is None:
        return {}
    out = {}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            out[(r["model"], int(r["img_size"]))] = r
    return out


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def timm_rows(network: str, arch: str, build_kwargs: dict, results: dict) -> list[dict]:
    import timm

    rows = []
    for tagged in timm.list_pretrained(f"{arch}.*"):
        cfg = timm.models.get_pretrained_cfg(tagged)
        with torch.device("meta"):
            base = timm.create_model(arch, pretrained=False, num_classes=cfg.num_classes)
            this = timm.create_model(tagged, pretrained=False)
        if _shapes(base) != _shapes(this):
            print(f"  skip {tagged}: another architecture than {arch}", file=sys.stderr)
            continue
        if cfg.hf_hub_id:
            file_name = cfg.hf_hub_filename or "model.safetensors"
            url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{file_name}"
        elif cfg.url:
            url, file_name = cfg.url, cfg.url.rsplit("/", 1)[-1]
        else:
            print(f"  skip {tagged}: no download location", file=sys.stderr)
            continue
        size = int(cfg.input_size[-1])
        r = results.get((tagged, size))
        metrics = {"top1": float(r["top1"]), "top5": float(r["top5"]), "eval_size": size} if r else {}
        n = int(cfg.num_classes)
        categories = {1000: "imagenet", 11821: "imagenet-12k", 21843: "imagenet-22k"}.get(n, f"{n}-class")
        rows.append(dict(
            network=network, tag=f"timm:{cfg.tag}", twin=f"timm:{arch}", url=url, file_name=file_name, sha256=None,
            license=cfg.license or "unknown", num_classes=n, categories=categories, mean=list(cfg.mean),
            std=list(cfg.std), input_size=list(cfg.input_size), crop_pct=float(cfg.crop_pct),
            interpolation=str(cfg.interpolation), metrics=metrics, file_size_mb=None, build_kwargs=build_kwargs,
            hf_hub_id=cfg.hf_hub_id or None, recipe=cfg.origin_url or None))
    return rows


def detector_rows() -> list[dict]:
    import torchvision

    rows = []
    for arch, build_kwargs in DETECTORS.items():
        for w in torchvision.models.get_model_weights(arch):
            file_name = w.url.rsplit("/", 1)[-1]
            rows.append(dict(
                network=arch, tag=f"torchvision:{w.name}", twin=f"torchvision:{arch}", url=w.url,
                file_name=file_name, sha256=Path(file_name).stem.rsplit("-", 1)[-1], license=TORCHVISION_LICENSE,
                num_classes=len(w.meta["categories"]), categories="coco",
                mean=list(vertebra.registry.IMAGENET_MEAN), std=list(vertebra.registry.IMAGENET_STD),
                input_size=[3, 800, 1333], crop_pct=1.0, interpolation="bilinear",
                metrics={"box_ap": w.meta["_metrics"]["COCO-val2017"]["box_map"]},
                file_size_mb=w.meta.get("_file_size"), build_kwargs=build_kwargs, hf_hub_id=None,
                recipe=w.meta.get("recipe")))
    return rows


def _commercial(license_: str) -> bool:
    return "nc" not in license_.lower().replace("-", " ").split()


def choose_defaults(rows: list[dict]) -> None:
    by_net: dict[str, list[dict]] = {}
    for r in rows:
        r["default"] = False
        by_net.setdefault(r["network"], []).append(r)
    for net, group in by_net.items():
        own = vertebra.backbone_spec(net).num_classes if net in vertebra.list_backbones() else group[0]["num_classes"]
        pool = [r for r in group if r["num_classes"] == own and _commercial(r["license"])] or group
        best = max(pool, key=lambda r: (r["metrics"].get("top1", r["metrics"].get("box_ap", -1.0)),
                                        r["tag"].startswith("torchvision:")))
        best["default"] = True


def check_build(network: str, twin: str, build_kwargs: dict) -> None:
    """Our network, with the twin's build arguments, has the twin's parameter count (the twin-equality test
    checks the outputs)."""
    from vertebra.reference.twins import build_twin

    with torch.device("meta"):
        ours = count_params(vertebra.create_backbone(network, **build_kwargs))
        theirs = count_params(build_twin(twin))
    if ours != theirs:
        raise SystemExit(f"{network} with {build_kwargs} has {ours} parameters, its twin {twin} {theirs}")


def write_class_names(folder: Path) -> None:
    """``imagenet_classes.txt`` (1000 names) and ``coco_classes.txt`` (torchvision's 91 COCO labels, ``N/A``
    and ``__background__`` included, so that a label is the COCO category id): one name per line, by label."""
    from torchvision.models._meta import _COCO_CATEGORIES, _IMAGENET_CATEGORIES

    for name, names in (("imagenet", _IMAGENET_CATEGORIES), ("coco", _COCO_CATEGORIES)):
        (folder / f"{name}_classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timm-results", type=Path, default=None,
                   help="timm's results/results-imagenet.csv (for the accuracy of timm's weights)")
    p.add_argument("--out", type=Path, default=TABLE_PATH)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = read_timm_results(args.timm_results)
    rows: list[dict] = []
    for name in vertebra.list_backbones():
        spec = vertebra.backbone_spec(name)
        twins = list(spec.references) + [t for (n, t) in TWIN_BUILD_KWARGS if n == name and t not in spec.references]
        for twin in twins:
            kw = dict(TWIN_BUILD_KWARGS.get((name, twin), {}))
            check_build(name, twin, kw)
            source, arch = twin.split(":", 1)
            found = torchvision_rows(name, arch, kw) if source == "torchvision" else timm_rows(name, arch, kw, results)
            print(f"{name:28s} {twin:36s} {len(found)} sets", file=sys.stderr)
            rows.extend(found)
    rows.extend(detector_rows())
    choose_defaults(rows)
    order = ["network", "tag", "twin", "default", "url", "file_name", "sha256", "license", "num_classes",
             "categories", "mean", "std", "input_size", "crop_pct", "interpolation", "metrics", "file_size_mb",
             "build_kwargs", "hf_hub_id", "recipe"]
    rows = [{k: r[k] for k in order} for r in sorted(rows, key=lambda r: (r["network"], r["tag"]))]
    args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    write_class_names(args.out.parent)
    nets = sorted({r["network"] for r in rows})
    print(f"{len(rows)} sets of weights for {len(nets)} networks -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
