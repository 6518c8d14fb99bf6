"""Pascal VOC detection data (the devkit layout), XML read with defusedxml.

Layout under ``root`` (e.g. ``VOCdevkit/VOC2007``)::

    Annotations/<id>.xml   JPEGImages/<id>.jpg   ImageSets/Main/<split>.txt

Boxes: VOC stores 1-based, inclusive pixel indices; they become 0-based continuous XYXY pixels
(``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax``), so a box of one pixel has width 1.
``difficult`` objects are kept, flagged in ``target["difficult"]`` (evaluation ignores them; set
``keep_difficult=False`` to drop them). Labels index ``classes`` (the 20 VOC classes by default);
``label_to_category_id`` maps a label back to its class name, the VOC file's "id".

``image_id`` is the integer of the file id's digits (``000005`` -> 5, ``2008_000123`` -> 2008000123), or the
position in the split file when ids are not numeric or would collide; ``image_names[i]`` keeps the id.

Validation (at construction): an annotation XML that is missing, malformed or lacks ``size``/``bndbox``
fields, an unknown class name, ``xmax < xmin`` or ``ymax < ymin``, a box entirely outside the image:
error naming the file and field, or with ``skip_bad=True`` a logged, counted skip (of the object; of the
whole image for a missing/malformed XML). Boxes partly outside are clipped and counted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .common import MAX_SIDE, DataError, DetectionDataset, ImageError, ImageRecord, check_box, image_size

__all__ = ["VOCDetection", "VOC_CLASSES", "parse_voc_xml"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def _text(node, tag: str, where: str, required: bool = True) -> str | None:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise DataError(f"{where}: missing field <{tag}>", "malformed XML")
        return None
    return child.text.strip()


def _number(node, tag: str, where: str) -> float:
    s = _text(node, tag, where)
    try:
        v = float(s)
    except ValueError:
        raise DataError(f"{where}: <{tag}> must be a number, got {s!r}", "malformed XML") from None
    if not math.isfinite(v):
        raise DataError(f"{where}: <{tag}> is not finite ({s})", "non-finite box")
    return v


def parse_voc_xml(path: str | os.PathLike) -> dict:
    """Parse one VOC annotation file into ``{"filename", "width", "height", "objects": [...]}``.

    Each object is ``{"name", "difficult", "bbox": (xmin, ymin, xmax, ymax), "where"}`` (raw VOC values).
    ``width``/``height`` are None when ``<size>`` is absent or zero. Raises DataError naming the file.
    """
    import defusedxml.ElementTree as ET
    from defusedxml import DefusedXmlException

    p = Path(path)
    try:
        root = ET.parse(str(p)).getroot()
    except FileNotFoundError:
        raise DataError(f"{p}: annotation file not found", "missing annotation") from None
    except ET.ParseError as e:
        raise DataError(f"{p}: malformed XML: {e}", "malformed XML") from None
    except DefusedXmlException as e:
        raise DataError(f"{p}: refused XML ({type(e).__name__}: {e})", "malformed XML") from None
    except (LookupError, ValueError, RecursionError) as e:  # an unknown encoding declaration, nesting too deep
        raise DataError(f"{p}: malformed XML: {type(e).__name__}: {e}", "malformed XML") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read annotation file ({e.strerror or e})", "missing annotation") from None
    if root.tag != "annotation":
        raise DataError(f"{p}: root element is <{root.tag}>, expected <annotation>", "malformed XML")
    out: dict = {"filename": _text(root, "filename", str(p), required=False), "width": None, "height": None}
    size = root.find("size")
    if size is not None:
        w = _text(size, "width", f"{p}: <size>", required=False)
        h = _text(size, "height", f"{p}: <size>", required=False)
        try:
            wi, hi = int(float(w)) if w else 0, int(float(h)) if h else 0
            if max(wi, hi) > MAX_SIDE:
                raise ValueError
        except (ValueError, OverflowError):  # not a number, nan, inf
            raise DataError(f"{p}: <size> width/height must be integers, got {w!r}, {h!r}", "malformed XML") from None
        if wi > 0 and hi > 0:
            out["width"], out["height"] = wi, hi
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"{p}: object {k}"
        name = _text(obj, "name", where)
        where = f"{p}: object {k} ({name})"
        diff = _text(obj, "difficult", where, required=False)
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{where}: missing field <bndbox>", "malformed XML")
        bwhere = f"{where} <bndbox>"
        box = tuple(_number(bb, t, bwhere) for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append({"name": name, "difficult": diff not in (None, "0"), "bbox": box, "where": where})
    out["objects"] = objects
    return out


def _numeric_ids(names: Sequence[str]) -> list[int]:
    ids = []
    for n in names:
        digits = n.replace("_", "")
        if not digits.isdigit():
            return list(range(len(names)))
        ids.append(int(digits))
    if len(set(ids)) != len(ids):
        return list(range(len(names)))
    return ids


class VOCDetection(DetectionDataset):
    """A Pascal VOC split.

    Args:
        root: the year folder holding ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/``.
        split: name of ``ImageSets/Main/<split>.txt`` (``train``, ``val``, ``trainval``, ``test``).
        transforms: called as ``transforms(image, target)``.
        classes: class names in label order (default the 20 VOC classes).
        skip_bad: skip (log and count) bad annotations and images instead of raising.
        keep_difficult: keep difficult objects (flagged in ``target["difficult"]``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "trainval",
        transforms: Callable | None = None,
        *,
        classes: Sequence[str] = VOC_CLASSES,
        skip_bad: bool = False,
        keep_difficult: bool = True,
    ):
        self.root = Path(root)
        self.split = split
        super().__init__(f"{self.root}[{split}]", transforms, skip_bad)
        if not (self.root / "Annotations").is_dir():
            raise FileNotFoundError(
                f"{self.root}: no Annotations/ folder; point root at a VOC year folder such as VOCdevkit/VOC2007"
            )
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            main = self.root / "ImageSets" / "Main"
            have = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []
            raise FileNotFoundError(f"{split_file}: split file not found (splits here: {have or 'none'})")
        names = [ln.split()[0] for ln in split_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes) or not classes:
            raise ValueError(f"classes must be distinct and non-empty, got {classes}")
        self.categories = list(classes)
        self.label_to_category_id = dict(enumerate(classes))
        self.category_id_to_label = {c: i for i, c in enumerate(classes)}
        self.keep_difficult = keep_difficult
        ids = _numeric_ids(names)
        self.records = []
        self.image_names: list[str] = []
        for name, iid in zip(names, ids):
            rec = self._parse_one(name, iid)
            if rec is not None:
                self.records.append(rec)
                self.image_names.append(name)
        self._finish()

    def _parse_one(self, name: str, iid: int) -> ImageRecord | None:
        xml = self.root / "Annotations" / f"{name}.xml"
        try:
            ann = parse_voc_xml(xml)
        except DataError as e:
            self._bad(e)
            return None
        path = self.root / "JPEGImages" / (ann["filename"] or f"{name}.jpg")
        try:
            exists = path.is_file()
        except (OSError, ValueError) as e:  # a <filename> too long, or with a NUL byte
            self._bad(DataError(f"{xml}: <filename> {ann['filename']!r} is not a usable file name ({e})",
                                "malformed XML"))
            return None
        if not exists and (self.root / "JPEGImages" / f"{name}.jpg").is_file():
            path = self.root / "JPEGImages" / f"{name}.jpg"
        w, h = ann["width"], ann["height"]
        if w is None:  # a few VOC files have <size> 0: read the image header
            try:
                h, w = image_size(path)
            except ImageError as e:
                self._bad(DataError(f"{xml}: no <size> and {e}", e.reason))
                return None
        boxes, labels, diffs = [], [], []
        for obj in ann["objects"]:
            try:
                lab = self.category_id_to_label.get(obj["name"])
                if lab is None:
                    known = ", ".join(self.categories)
                    raise DataError(f"{obj['where']}: unknown class '{obj['name']}' (known: {known})",
                                    "unknown category")
                xmin, ymin, xmax, ymax = obj["bbox"]
                if xmax < xmin:
                    raise DataError(f"{obj['where']}: xmax {xmax:g} < xmin {xmin:g}", "box x2 < x1")
                if ymax < ymin:
                    raise DataError(f"{obj['where']}: ymax {ymax:g} < ymin {ymin:g}", "box y2 < y1")
                box, clipped = check_box(xmin - 1, ymin - 1, xmax, ymax, w, h, obj["where"])
            except DataError as e:
                self._bad(e)
                continue
            if obj["difficult"] and not self.keep_difficult:
                continue
            self.log.clipped += int(clipped)
            boxes.append(box)
            labels.append(lab)
            diffs.append(obj["difficult"])
        return ImageRecord(
            iid, path, int(h), int(w),
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64),
            {"difficult": np.asarray(diffs, dtype=bool)},
        )
