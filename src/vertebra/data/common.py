"""Shared pieces of the data layer: image decoding, errors, skip bookkeeping, the detection base class.

Conventions (every dataset in :mod:`vertebra.data` keeps to them):

* an image is a ``tv_tensors.Image``, float32 in 0..1, 3 x H x W (grayscale is repeated to three
  channels, an alpha channel is dropped, 16-bit images are divided by 65535);
* a detection target is ``{"boxes": tv_tensors.BoundingBoxes (XYXY, pixels), "labels": int64 0..K-1,
  "image_id": int, "orig_size": (h, w)}`` plus ``"difficult"`` (VOC) or ``"iscrowd"`` (COCO, when
  crowds are kept) as bool tensors aligned with the boxes;
* bad input raises a :class:`DataError` (a ``ValueError``) naming the file and the field, or, with
  ``skip_bad=True``, is logged on the ``"vertebra.data"`` logger and counted in ``dataset.skipped``
  (a ``Counter`` of reasons).  Annotations are validated when the dataset is built; images when they
  are loaded.  A bad image met with ``skip_bad=True`` is replaced by the next valid index (so an
  epoch then sees a few images twice); the counts live in the process that loads, so with DataLoader
  workers each worker keeps its own.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

try:  # torchvision's fast decoder (JPEG, PNG incl. 16-bit, WebP, GIF); PIL reads the rest, or all without it
    from torchvision.io import ImageReadMode as _ImageReadMode
    from torchvision.io import decode_image as _decode_image
except ImportError:  # pragma: no cover - a torchvision without image ops
    _decode_image = _ImageReadMode = None

logger = logging.getLogger("vertebra.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

# Individual skip warnings logged per dataset before they are only counted (the summary line has them all).
MAX_SKIP_WARNINGS = 20
#: the largest image side an annotation may state (larger is a corrupt entry, and beyond float precision for boxes)
MAX_SIDE = 1 << 20
#: the most pixels an image may declare: PIL's decompression-bomb limit, applied before any decoder allocates
MAX_PIXELS = 2 * 89_478_485
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

__all__ = [
    "DataError",
    "ImageError",
    "MissingImageError",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "is_video",
    "read_video_frames",
    "MAX_SIDE",
    "MAX_PIXELS",
    "read_image",
    "image_size",
    "collate_detection",
    "collate_classification",
    "DetectionDataset",
    "ImageRecord",
    "SkipLog",
    "SkippingDataset",
]


class DataError(ValueError):
    """Bad data (annotation or image). The message names the file, the field and, where there is one, the fix."""

    def __init__(self, message: str, reason: str = "bad data"):
        super().__init__(message)
        self.reason = reason


class ImageError(DataError):
    """An image that cannot be decoded (corrupt, truncated, unknown format) or disagrees with its annotation."""

    def __init__(self, message: str, reason: str = "corrupt image"):
        super().__init__(message, reason)


class MissingImageError(ImageError, FileNotFoundError):
    """An image file that does not exist. Both a ``ValueError`` and a ``FileNotFoundError``."""

    def __init__(self, message: str, reason: str = "missing image"):
        ImageError.__init__(self, message, reason)


# --------------------------------------------------------------------------------------------- decoding


def _short(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    # torchvision prefixes its C++ errors with "decode_jpeg, /path/file.cpp:171, <message>"; torch's own with
    # "[enforce fail at alloc_cpu.cpp:117] <message>"
    if ".cpp:" in msg:
        msg = re.split(r"\.cpp:\d+\]?,?\s*", msg)[-1].strip() or msg
    return msg


def _declared_pixels(data: bytes) -> int | None:
    """The pixel count the image's header declares (PIL, no decode): None where PIL cannot read the header, more
    than :data:`MAX_PIXELS` for a header PIL itself refuses as a decompression bomb."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: MAX_PIXELS is the limit here
            with Image.open(io.BytesIO(data)) as im:
                return im.size[0] * im.size[1]
    except Image.DecompressionBombError:
        return MAX_PIXELS + 1
    except Exception:  # noqa: BLE001 - a header PIL cannot read: the decoders say why
        return None


def _to_float_rgb(t: torch.Tensor) -> torch.Tensor:
    """C x H x W integer tensor (1..4 channels, uint8 or uint16) -> 3 x H x W float32 in 0..1."""
    c = t.shape[0]
    if c == 2:  # gray + alpha
        t = t[:1]
    elif c == 4:  # RGBA: drop alpha
        t = t[:3]
    elif c not in (1, 3):
        raise ValueError(f"unsupported channel count {c}")
    if t.dtype == torch.uint8:
        out = t.to(torch.float32).div_(255.0)
    elif t.dtype == torch.uint16:
        out = t.to(torch.int32).to(torch.float32).div_(65535.0)
    elif t.dtype.is_floating_point:
        out = t.to(torch.float32).clamp_(0.0, 1.0)
    else:
        raise ValueError(f"unsupported pixel type {t.dtype}")
    if out.shape[0] == 1:
        out = out.expand(3, -1, -1).contiguous()
    return out


def _decode_pil(data: bytes, exif: bool) -> torch.Tensor:
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if exif:
            im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            arr = np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
        elif mode == "I":  # 32-bit int: PIL's container for 16-bit grayscale in older versions
            arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.float32) / 65535.0
        elif mode == "F":
            arr = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
        elif mode == "L":
            arr = np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0
        else:
            has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info)
            if has_alpha:
                im = im.convert("RGBA")
            elif mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)[..., :3].astype(np.float32) / 255.0
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim == 2:
        t = t.unsqueeze(0).expand(3, -1, -1).contiguous()
    else:
        t = t.permute(2, 0, 1).contiguous()
    return t


def read_image(path: str | os.PathLike, *, exif: bool = False, context: str = "") -> tv_tensors.Image:
    """Read an image file as a ``tv_tensors.Image``: float32, 0..1, 3 x H x W.

    Decoded with ``torchvision.io.decode_image`` (JPEG, PNG incl. 16-bit, WebP, GIF), falling back to PIL for
    the formats it does not read (BMP, TIFF, PNM, ...). Grayscale becomes three channels, alpha is dropped,
    16-bit pixels are divided by 65535. ``exif=True`` applies the EXIF orientation (classification folders);
    detection leaves it off, as boxes are annotated in the stored pixel grid.

    Raises :class:`MissingImageError` for a missing file and :class:`ImageError` for an empty, corrupt,
    truncated or unreadable one, both naming the file (``context``, e.g. ``"(image id 3 in ann.json)"``,
    is appended).
    """
    p = Path(path)
    ctx = f" {context}" if context else ""
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise MissingImageError(f"{p}: image file not found{ctx}") from None
    except IsADirectoryError:
        raise ImageError(f"{p}: is a directory, not an image file{ctx}", "unreadable image") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read image file ({e.strerror or e}){ctx}", "unreadable image") from None
    except (ValueError, UnicodeError) as e:  # a NUL byte or an unencodable character in the name
        raise ImageError(f"{str(p)!r}: not a usable file name ({e}){ctx}", "unreadable image") from None
    if not data:
        raise ImageError(f"{p}: image file is empty (0 bytes){ctx}")
    pixels = _declared_pixels(data)
    if pixels is not None and pixels > MAX_PIXELS:
        raise ImageError(f"{p}: its header declares more than {MAX_PIXELS} pixels (a corrupt or hostile file){ctx}",
                         "image too large")
    tv_err: BaseException | None = None
    # PNG goes to PIL: torchvision's decode_png (libpng) can crash the process on a corrupt file
    if _decode_image is not None and not data.startswith(_PNG_SIGNATURE):
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they are still the fast path
                warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
                # RGB mode: gray and palette -> RGB, alpha stripped, CMYK JPEG converted; 16-bit PNG stays uint16
                raw = _decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_ImageReadMode.RGB,
                                    apply_exif_orientation=exif)
            return tv_tensors.Image(_to_float_rgb(raw))
        except (RuntimeError, ValueError) as e:
            tv_err = e
    try:
        out = _decode_pil(data, exif)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        unsupported = tv_err is None or "Unsupported image file" in str(tv_err)
        why = _short(e) if unsupported else _short(tv_err)
        raise ImageError(f"{p}: cannot decode image: {why}{ctx}") from None
    return tv_tensors.Image(out)


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a video file (by extension, :data:`VIDEO_EXTENSIONS`)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def read_video_frames(path: str | os.PathLike):
    """Yield ``(frame number from 0, image)`` of a video file, each image as :func:`read_image` gives it, decoded
    by PyAV (``pip install av``). Raises :class:`ImageError` naming the file when PyAV is missing or the video cannot
    be decoded (the frames yielded before stay valid)."""
    p = Path(path)
    try:
        import av
    except ImportError:
        raise ImageError(f"{p}: reading video needs PyAV (pip install av); or extract the frames as images "
                         "first", "video needs PyAV") from None
    try:
        with av.open(str(p)) as container:
            for k, frame in enumerate(container.decode(video=0)):
                arr = np.ascontiguousarray(frame.to_ndarray(format="rgb24"))
                yield k, tv_tensors.Image(torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0))
    except ImageError:
        raise
    except FileNotFoundError:
        raise MissingImageError(f"{p}: video file not found") from None
    except Exception as e:  # noqa: BLE001 - av.error.* (InvalidDataError, ...), OSError
        raise ImageError(f"{p}: cannot decode video: {_short(e)}", "corrupt video") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image from its header (PIL, no full decode). Raises ImageError/MissingImageError."""
    from PIL import Image

    p = Path(path)
    try:
        with Image.open(p) as im:
            w, h = im.size
    except FileNotFoundError:
        raise MissingImageError(f"{p}: image file not found") from None
    except Exception as e:
        raise ImageError(f"{p}: cannot read image header: {_short(e)}") from None
    return h, w


# --------------------------------------------------------------------------------------------- collate


def collate_detection(batch: Sequence[tuple[Any, Any]]) -> tuple[list, list]:
    """Keep a list of images and a list of targets (images differ in size; the detector batches them)."""
    images, targets = [], []
    for img, tgt in batch:
        images.append(img)
        targets.append(tgt)
    return images, targets


def collate_classification(batch: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack same-sized images into B x 3 x H x W and labels into an int64 tensor."""
    images = torch.stack([torch.as_tensor(img) for img, _ in batch])
    labels = torch.as_tensor([int(t) for _, t in batch], dtype=torch.int64)
    return images, labels


# --------------------------------------------------------------------------------------------- skip log


class SkipLog:
    """Counts and logs skipped items of one dataset (``skipped``: Counter of reasons; ``clipped``: int)."""

    def __init__(self, name: str):
        self.name = name
        self.skipped: Counter[str] = Counter()
        self.clipped = 0
        self._warned = 0

    def skip(self, err: DataError | str, reason: str | None = None) -> None:
        reason = reason or getattr(err, "reason", "bad data")
        self.skipped[reason] += 1
        if self._warned < MAX_SKIP_WARNINGS:
            logger.warning("skipped: %s", err)
        elif self._warned == MAX_SKIP_WARNINGS:
            logger.warning("%s: more than %d skips; further ones are only counted", self.name, MAX_SKIP_WARNINGS)
        self._warned += 1

    def summary(self, total: int | None = None, what: str = "") -> str:
        parts = []
        n = sum(self.skipped.values())
        if n:
            reasons = ", ".join(f"{r}: {c}" for r, c in sorted(self.skipped.items(), key=lambda x: (-x[1], x[0])))
            of = f" of {total}" if total is not None else ""
            parts.append(f"skipped {n}{of}{' ' + what if what else ''} ({reasons})")
        if self.clipped:
            parts.append(f"clipped {self.clipped} boxes partly outside their image")
        if not parts:
            return f"{self.name}: nothing skipped"
        return f"{self.name}: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------- detection base


@dataclass
class ImageRecord:
    """One image of a detection set, validated: boxes are XYXY pixels inside the image, labels 0..K-1."""

    image_id: int
    path: Path
    height: int
    width: int
    boxes: np.ndarray  # (N, 4) float32 xyxy
    labels: np.ndarray  # (N,) int64
    flags: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. "difficult", "iscrowd": (N,) bool


def check_box(
    x1: float, y1: float, x2: float, y2: float, width: int, height: int, where: str
) -> tuple[tuple[float, float, float, float] | None, bool]:
    """Validate an XYXY box against its image; returns (clipped box, was_clipped). Raises DataError."""
    vals = (x1, y1, x2, y2)
    if not all(math.isfinite(v) for v in vals):
        raise DataError(f"{where}: box {list(vals)} has a non-finite coordinate", "non-finite box")
    if x2 < x1:
        raise DataError(f"{where}: box x2 {x2:g} < x1 {x1:g}", "box x2 < x1")
    if y2 < y1:
        raise DataError(f"{where}: box y2 {y2:g} < y1 {y1:g}", "box y2 < y1")
    if x2 == x1 or y2 == y1:
        raise DataError(f"{where}: zero-area box {[round(v, 3) for v in vals]}", "zero-area box")
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        raise DataError(
            f"{where}: box {[round(v, 3) for v in vals]} lies entirely outside the {width}x{height} image",
            "box outside image",
        )
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    f1, g1, f2, g2 = np.array([cx1, cy1, cx2, cy2], dtype=np.float64).astype(np.float32).tolist()
    if not (f2 > f1 and g2 > g1):  # as the float32 boxes of the targets: a detector refuses zero-area boxes
        raise DataError(f"{where}: box {[round(v, 3) for v in vals]} has no area in float32 pixels (width "
                        f"{cx2 - cx1:.3g}, height {cy2 - cy1:.3g} after clipping)", "zero-area box")
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    return (cx1, cy1, cx2, cy2), clipped


class SkippingDataset(Dataset):
    """A dataset whose ``__getitem__`` loads item ``index`` (:meth:`load_item`) or, with ``skip_bad``, the next one
    that loads: an :class:`ImageError` is logged and counted in ``skipped`` (``self.log``, a :class:`SkipLog`) and the
    bad index is not tried again. Subclasses set ``self.skip_bad`` and ``self.log`` and call :meth:`_init_skips`."""

    skip_bad: bool
    log: SkipLog

    def _init_skips(self) -> None:
        self._bad_index: set[int] = set()

    @property
    def skipped(self) -> Counter:
        return self.log.skipped

    def load_item(self, index: int):
        raise NotImplementedError

    def __getitem__(self, index: int):
        n, name = len(self), self.log.name
        if n == 0:
            raise IndexError(f"{name}: the dataset is empty")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{name}: index {index} out of range for {n} images")
        for k in range(n):
            j = (index + k) % n
            if j in self._bad_index:
                continue
            try:
                return self.load_item(j)
            except ImageError as e:
                if not self.skip_bad:
                    raise
                self._bad_index.add(j)
                self.log.skip(e)
        raise DataError(f"{name}: no image could be loaded ({self.log.summary(what='images')})", "no valid image")


class DetectionDataset(SkippingDataset):
    """Base class of the detection sets: holds validated :class:`ImageRecord` s and loads images lazily.

    Subclasses parse their format into ``self.records`` and set ``categories`` (names, index = label),
    ``label_to_category_id`` and ``category_id_to_label``, then call :meth:`_finish`.
    """

    records: list[ImageRecord]
    categories: list[str]
    label_to_category_id: dict[int, Any]
    category_id_to_label: dict[Any, int]

    def __init__(self, name: str, transforms: Callable | None = None, skip_bad: bool = False):
        self.name = name
        self.transforms = transforms
        self.skip_bad = skip_bad
        self.log = SkipLog(name)
        self._init_skips()

    # bookkeeping --------------------------------------------------------------------------------------
    @property
    def clipped(self) -> int:
        return self.log.clipped

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def counts(self) -> dict[str, Any]:
        """What the annotations gave, after validation: images, boxes, classes, images without a box (kept), boxes
        clipped to their image, annotations skipped by reason (``skip_bad``; boxes inverted or empty, unknown
        ids ...), crowd boxes left out. The images themselves are checked when loaded (``skipped`` grows then)."""
        return {"images": len(self.records), "boxes": int(sum(len(r.labels) for r in self.records)),
                "classes": self.num_classes,
                "images_without_boxes": int(sum(1 for r in self.records if not len(r.labels))),
                "clipped_boxes": int(self.clipped), "skipped": dict(self.skipped),
                "ignored_crowd": int(getattr(self, "ignored_crowd", 0))}

    def summary(self) -> str:
        n_ann = sum(len(r.labels) for r in self.records)
        return self.log.summary(what="") + f" ({len(self.records)} images, {n_ann} boxes, {self.num_classes} classes)"

    def _bad(self, err: DataError) -> None:
        """Raise ``err`` or, with skip_bad, log and count it."""
        if not self.skip_bad:
            raise err
        self.log.skip(err)

    def _finish(self) -> None:
        if self.skipped:
            logger.warning("%s", self.summary())
        elif self.clipped:
            logger.info("%s", self.summary())

    # Dataset ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> tv_tensors.Image:
        rec = self.records[index]
        img = read_image(rec.path, context=f"(image id {rec.image_id} in {self.name})")
        h, w = img.shape[-2:]
        if (h, w) != (rec.height, rec.width):
            raise ImageError(
                f"{rec.path}: image is {w}x{h} but {self.name} says {rec.width}x{rec.height} (image id {rec.image_id});"
                " fix the annotation's width/height (an EXIF rotation?)",
                "image size mismatch",
            )
        return img

    def target(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        tgt: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(rec.boxes.reshape(-1, 4).astype(np.float32)),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=(rec.height, rec.width),
            ),
            "labels": torch.from_numpy(rec.labels.astype(np.int64)),
            "image_id": int(rec.image_id),
            "orig_size": (int(rec.height), int(rec.width)),
        }
        for k, v in rec.flags.items():
            tgt[k] = torch.from_numpy(v.astype(bool))
        return tgt

    def load_item(self, index: int):
        img, tgt = self.load_image(index), self.target(index)
        if self.transforms is not None:
            img, tgt = self.transforms(img, tgt)
        return img, tgt

    # evaluation helper --------------------------------------------------------------------------------
    def coco_ground_truth(self) -> dict[str, Any]:
        """The validated ground truth as a COCO dict (bbox xywh in original pixels, category ids = label + 1).

        VOC ``difficult`` and COCO crowd boxes get ``iscrowd=1, ignore=1``, so pycocotools ignores them.
        Use it with ``pycocotools.coco.COCO`` (``coco.dataset = d; coco.createIndex()``) for any format;
        map detections with ``category_id = label + 1``.
        """
        images, anns = [], []
        ann_id = 1
        for rec in self.records:
            images.append({"id": int(rec.image_id), "width": rec.width, "height": rec.height,
                           "file_name": rec.path.name})
            ignore = np.zeros(len(rec.labels), dtype=bool)
            for k in ("difficult", "iscrowd"):
                if k in rec.flags:
                    ignore |= rec.flags[k]
            for b, lab, ig in zip(rec.boxes, rec.labels, ignore):
                w, h = float(b[2] - b[0]), float(b[3] - b[1])
                anns.append({"id": ann_id, "image_id": int(rec.image_id), "category_id": int(lab) + 1,
                             "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h,
                             "iscrowd": int(ig), "ignore": int(ig)})
                ann_id += 1
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(self.categories)]
        return {"images": images, "annotations": anns, "categories": cats}
