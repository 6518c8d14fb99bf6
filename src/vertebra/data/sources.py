"""Where a run's data is: one :class:`DataSource` and the functions that open it.

A source is exactly one of: ``data`` (a shapes set or a COCO-2017 layout folder), ``coco_ann`` + ``coco_images``
(+ ``val_coco_ann`` / ``val_coco_images``), ``voc`` (a VOC year folder, with ``voc_train_split`` /
``voc_val_split``), ``folder`` (an image folder, ``train/`` + ``val/`` inside or the classes directly) or
``cifar`` (CIFAR python batches). None of them: the built-in shapes set (:func:`ensure_shapes`).

Training opens a (train, validation) pair (:func:`open_detection`, :func:`open_classification`); evaluation
opens one set (:func:`open_detection_eval`, :func:`open_classification_eval`), by default the validation
split of the source the run trained on (:meth:`DataSource.for_eval`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DataSource", "default_shapes_root", "ensure_shapes", "find_coco_split", "open_detection",
           "open_classification", "open_detection_eval", "open_classification_eval"]

#: the fields that name where the images are (the others are splits)
_LOCATIONS = ("data", "coco_ann", "voc", "folder", "cifar")


@dataclass
class DataSource:
    """One data source (see the module docstring); all fields None: the built-in shapes set."""

    data: str | None = None
    coco_ann: str | None = None
    coco_images: str | None = None
    val_coco_ann: str | None = None
    val_coco_images: str | None = None
    voc: str | None = None
    voc_train_split: str = "trainval"
    voc_val_split: str = "test"
    folder: str | None = None
    cifar: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSource:
        """From a saved config: its ``source`` entry, or (configs written before sources had a type) the flat
        fields of the config itself; other keys are ignored."""
        d = d.get("source", d) if isinstance(d.get("source"), dict) else d
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def kind(self) -> str | None:
        """Which location field is given (``data``, ``coco_ann``, ``voc``, ``folder``, ``cifar``), None for the
        shapes set. Raises ValueError for more than one."""
        given = [s for s in _LOCATIONS if getattr(self, s)]
        if len(given) > 1:
            raise ValueError(f"give one data source, got {', '.join(given)}")
        if self.coco_ann and not self.coco_images:
            raise ValueError("--coco ANN needs --images DIR")
        return given[0] if given else None

    @property
    def is_classification(self) -> bool:
        return self.kind in ("folder", "cifar")

    def for_eval(self, given: DataSource | None = None) -> DataSource:
        """The source ``vertebra eval`` measures: ``given`` when it names a location, else this (a run's)
        source's validation data, as a source whose ``coco_ann`` / ``coco_images`` are the validation set."""
        if given is not None and given.kind is not None:
            return given
        if self.coco_ann and not self.val_coco_ann:
            raise ValueError("the run had no validation set (--val-coco); give --coco ANN --images DIR")
        images = (self.val_coco_images or self.coco_images) if self.val_coco_ann else None
        return dataclasses.replace(self, coco_ann=self.val_coco_ann, coco_images=images, val_coco_ann=None,
                                   val_coco_images=None)


def default_shapes_root() -> Path:
    """Where the built-in shapes set is generated when no data is given: ``$VERTEBRA_SHAPES`` or
    ``~/.cache/vertebra/shapes``."""
    env = os.environ.get("VERTEBRA_SHAPES")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vertebra" / "shapes"


def ensure_shapes(root: str | os.PathLike | None = None) -> Path:
    """The built-in shapes set, generated into ``root`` (default :func:`default_shapes_root`) if absent. With
    several processes rank 0 writes it and the others wait for it."""
    from ..engine.distributed import barrier, is_distributed, is_main_process
    from .shapes import _is_shapes_set, write_shapes

    root = Path(root) if root is not None else default_shapes_root()
    if not _is_shapes_set(root) and is_main_process():
        print(f"generating the shapes set into {root} (once; about a minute)...", flush=True)
        write_shapes(root)
    if is_distributed():
        barrier()
        if not _is_shapes_set(root):
            raise FileNotFoundError(f"{root}: the shapes set rank 0 wrote is not on this machine; put it on a "
                                    "shared file system or write it on every machine first "
                                    "(vertebra data shapes --out DIR, then --data DIR)")
    return root


def find_coco_split(root: str | os.PathLike, split: str) -> tuple[Path, Path] | None:
    """(image folder, annotation file) of ``split`` in a COCO-2017 style folder, or None:
    ``annotations/instances_<split>[2017|2014].json`` and ``<split>[2017|2014]/`` (or ``images/<split>``)."""
    root = Path(root)

    def first(base: Path, names: tuple[str, ...]) -> Path | None:
        return next((base / n for n in names if (base / n).exists()), None)

    ann = first(root / "annotations", (f"instances_{split}.json", f"instances_{split}2017.json",
                                       f"instances_{split}2014.json"))
    img = first(root, (split, f"{split}2017", f"{split}2014", "images/" + split))
    if ann is None or img is None:
        return None
    return img, ann


def _coco_folder(source: DataSource) -> Path:
    return Path(source.data) if source.data else ensure_shapes()


def open_detection(source: DataSource, size: int, *, augment: str = "flip", skip_bad: bool = False):
    """(train set, validation set or None, is_voc) of a detection source, resized to ``size``."""
    from . import CocoDetection, VOCDetection
    from .transforms import detection_transforms

    kind = source.kind
    if kind in ("folder", "cifar"):
        raise ValueError("detection trains on --data, --coco or --voc (folders and CIFAR are for --task cls)")
    t_train = detection_transforms(True, size, scale_range=(1.0, 1.0), hflip=0.0 if augment == "none" else 0.5,
                                   photometric=augment == "full")
    t_val = detection_transforms(False, size)
    if kind == "voc":
        root = Path(source.voc)
        train = VOCDetection(root, source.voc_train_split, t_train, skip_bad=skip_bad)
        has_val = (root / "ImageSets" / "Main" / f"{source.voc_val_split}.txt").is_file()
        val = VOCDetection(root, source.voc_val_split, t_val, skip_bad=skip_bad) if has_val else None
        return train, val, True
    if kind == "coco_ann":
        train = CocoDetection(source.coco_images, source.coco_ann, t_train, skip_bad=skip_bad)
        val = None
        if source.val_coco_ann:
            val = CocoDetection(source.val_coco_images or source.coco_images, source.val_coco_ann, t_val,
                                skip_bad=skip_bad)
        return train, val, False
    root = _coco_folder(source)
    tr = find_coco_split(root, "train")
    if tr is None:
        raise FileNotFoundError(f"{root}: no COCO layout found (annotations/instances_train*.json and "
                                "train*/); give --coco ANN --images DIR or --voc ROOT instead")
    va = find_coco_split(root, "val")
    train = CocoDetection(tr[0], tr[1], t_train, skip_bad=skip_bad)
    return train, CocoDetection(va[0], va[1], t_val, skip_bad=skip_bad) if va else None, False


def open_detection_eval(source: DataSource, size: int, *, categories=None, voc_split: str | None = None,
                        skip_bad: bool = False):
    """(the set to evaluate, is_voc) of an evaluation source (see :meth:`DataSource.for_eval`)."""
    from . import CocoDetection, VOCDetection
    from .transforms import detection_transforms

    t = detection_transforms(False, size)
    kind = source.kind
    if kind == "voc":
        split = voc_split or source.voc_val_split or "test"
        return VOCDetection(source.voc, split, t, classes=categories, skip_bad=skip_bad), True
    if kind == "coco_ann":
        return CocoDetection(source.coco_images, source.coco_ann, t, skip_bad=skip_bad), False
    if kind in ("folder", "cifar"):
        raise ValueError("detection checkpoints evaluate on --data, --coco or --voc")
    root = _coco_folder(source)
    va = find_coco_split(root, "val")
    if va is None:
        raise FileNotFoundError(f"{root}: no validation split (annotations/instances_val*.json + val*/)")
    return CocoDetection(va[0], va[1], t, skip_bad=skip_bad), False


def open_classification(source: DataSource, size: int, *, mean, std, skip_bad: bool = False):
    """(train set, validation set or None) of a classification source, cropped to ``size``."""
    from . import CIFAR, ImageFolder
    from .transforms import classification_transforms

    kind = source.kind
    if kind not in ("folder", "cifar"):
        raise ValueError("classification trains on --folder DIR or --cifar DIR" if kind else
                         "classification needs --folder DIR or --cifar DIR")
    t_train = classification_transforms(True, size, mean=mean, std=std)
    t_val = classification_transforms(False, size, mean=mean, std=std)
    if kind == "cifar":
        return CIFAR(source.cifar, True, t_train), CIFAR(source.cifar, False, t_val)
    root = Path(source.folder)
    if not (root / "train").is_dir():
        return ImageFolder(root, t_train, skip_bad=skip_bad), None
    train = ImageFolder(root / "train", t_train, skip_bad=skip_bad)
    val = ImageFolder(root / "val", t_val, classes=train.classes, skip_bad=skip_bad) if (root / "val").is_dir() \
        else None
    return train, val


def open_classification_eval(source: DataSource, size: int, *, mean, std, categories=None, skip_bad: bool = False):
    """The set a classifier is evaluated on: CIFAR's test batch, or a folder's ``val/`` (else the folder)."""
    from . import CIFAR, ImageFolder
    from .transforms import classification_transforms

    t = classification_transforms(False, size, mean=mean, std=std)
    if source.cifar:
        return CIFAR(source.cifar, False, t)
    if not source.folder:
        raise ValueError("classification checkpoints evaluate on --folder DIR or --cifar DIR")
    root = Path(source.folder)
    root = root / "val" if (root / "val").is_dir() else root
    return ImageFolder(root, t, classes=categories, skip_bad=skip_bad)
