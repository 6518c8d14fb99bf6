"""*shapes*: the built-in synthetic detection set, written as real files in COCO format.

Layout written by :func:`write_shapes` (the COCO 2017 layout)::

    out_dir/
      shapes.json                        generator, version, seed, size, counts, classes
      annotations/instances_train.json   COCO JSON (images, annotations, categories)
      annotations/instances_val.json
      train/000000.jpg ...               JPEG, quality 92, size x size
      val/000000.jpg ...

Defaults: 2000 train and 300 val images of 256 x 256 px, seed 0 (``vertebra data shapes --out DIR``).

Content: six classes, category ids 1..6 — circle, square, triangle, star, cross, hexagon — each rotated at
random (circles excepted), 1 to 10 per image (about 6 % of images have none), their size (circumscribed
diameter) drawn log-uniformly from 8 px to half the image side, so every FPN level from P3 to P7 gets
objects. Objects may overlap (each keeps at least half of its area visible) and may be cut by the image
border (at most about a third of the diameter). Backgrounds are textured: flat + noise, linear gradients,
sine or square stripes at any angle, low-frequency blotches; clutter that is no object is drawn under and
over the shapes: lines, open zigzags, open arcs, dots under 5 px. Objects are filled flat, with noise, with
a gradient or with stripes, in a colour chosen to stand out from the background under them.

Boxes are the tight boxes of each shape's *visible* pixels (COCO's convention), ``[x, y, w, h]`` in pixels;
``area`` is the visible pixel count, ``iscrowd`` 0.

Determinism: image ``i`` of a split depends only on ``(seed, split, i, size)`` (its own
``numpy.random.default_rng([seed, split, i])``), so a set is byte-identical for the same arguments with
the same numpy / Pillow / libjpeg, and the first ``n`` images do not depend on the total count.
The set is written to a temporary folder and renamed into place: nothing half-written is left behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPE_CLASSES",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "DEFAULT_SIZE",
    "render_shapes_image",
    "write_shapes",
    "load_shapes",
    "shapes_paths",
]

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 300
DEFAULT_SIZE = 256
VERSION = 1
JPEG_QUALITY = 92
_SPLIT_CODE = {"train": 0, "val": 1}

MIN_OBJECT = 8.0  # px, diameter of the circumscribed circle
MAX_OBJECTS = 10
EMPTY_FRACTION = 0.06
MIN_VISIBLE = 0.5  # fraction of an object's in-image area that stays visible


# --------------------------------------------------------------------------------------------- backgrounds


def _color(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour, float32 (3,)."""
    return rng.uniform(0, 255, 3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(0, 4)
    ax = np.arange(size, dtype=np.float32)
    if kind == 0:  # flat
        img = np.empty((3, size, size), np.float32)
        img[:] = _color(rng)[:, None, None]
    elif kind == 1:  # linear gradient
        a = rng.uniform(0, 2 * math.pi)
        t = ax[None, :] * math.cos(a) + ax[:, None] * math.sin(a)
        t = (t - t.min()) * (1.0 / max(float(t.max() - t.min()), 1e-6))
        c0, c1 = _color(rng)[:, None, None], _color(rng)[:, None, None]
        img = c0 + t[None] * (c1 - c0)
    elif kind == 2:  # stripes
        a = rng.uniform(0, math.pi)
        period = rng.uniform(4, 48)
        f = 2 * math.pi / period
        s = np.sin(ax[None, :] * (math.cos(a) * f) + ax[:, None] * (math.sin(a) * f) + rng.uniform(0, 2 * math.pi))
        if rng.random() < 0.5:
            s = np.sign(s)
        t = (s + 1) * 0.5
        c0, c1 = _color(rng)[:, None, None], _color(rng)[:, None, None]
        c1 = c0 + (c1 - c0) * np.float32(rng.uniform(0.2, 0.7))  # keep stripes softer than the objects
        img = c0 + t[None] * (c1 - c0)
    else:  # blotches: low-resolution noise upsampled
        g = int(rng.integers(3, 12))
        small = rng.integers(0, 256, (g, g, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
        img = img.astype(np.float32)
    sigma = rng.uniform(0, 20)
    if sigma > 1:
        img += _noise(rng, (size, size), sigma)[None]
    return img


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean uniform noise of standard deviation ``sigma`` (uniform: cheaper to draw than Gaussian)."""
    return (rng.random(shape, dtype=np.float32) - np.float32(0.5)) * np.float32(sigma * math.sqrt(12.0))


# --------------------------------------------------------------------------------------------- shapes


def _polygon(cls: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of circumradius ``r`` (None for the circle, drawn as an ellipse)."""
    if cls == "circle":
        return None
    if cls == "square":
        pts = [(r * math.cos(k * math.pi / 2 + math.pi / 4), r * math.sin(k * math.pi / 2 + math.pi / 4))
               for k in range(4)]
    elif cls == "triangle":
        pts = [(r * math.cos(k * 2 * math.pi / 3 - math.pi / 2), r * math.sin(k * 2 * math.pi / 3 - math.pi / 2))
               for k in range(3)]
    elif cls == "hexagon":
        pts = [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]
    elif cls == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            a = k * math.pi / 5 - math.pi / 2
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    elif cls == "cross":
        w = r * 0.32  # arm half-width
        L = math.sqrt(max(r * r - w * w, 1e-6))  # arm tips on the circumcircle
        pts = [(w, w), (L, w), (L, -w), (w, -w), (w, -L), (-w, -L), (-w, -w), (-L, -w), (-L, w), (-w, w),
               (-w, L), (w, L)]
    else:
        raise ValueError(cls)
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _fill(rng: np.random.Generator, base: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Fill texture (3 x h x w) for the region [y0:y1, x0:x1]: flat, noisy, gradient or striped around ``base``."""
    h, w = y1 - y0, x1 - x0
    kind = rng.random()
    base = base[:, None, None]
    if kind < 0.55:
        return np.broadcast_to(base, (3, h, w))
    if kind < 0.75:
        return base + _noise(rng, (h, w), rng.uniform(6, 20))[None]
    a = rng.uniform(0, 2 * math.pi)
    proj = (np.arange(x0, x1, dtype=np.float32)[None, :] * math.cos(a)
            + np.arange(y0, y1, dtype=np.float32)[:, None] * math.sin(a))
    other = np.clip(base + rng.uniform(-70, 70, (3, 1, 1)).astype(np.float32), 0, 255)
    if kind < 0.9:
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    else:
        t = (np.sin(proj * (2 * math.pi / rng.uniform(3, 10))) > 0).astype(np.float32)
    return base + t[None] * (other - base)


def _distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int, n: int, thin: bool,
                 mask: bool = False) -> None:
    """Clutter that is no object; ``mask=True`` draws the same marks (same rng draws) in 255 on an "L" image."""
    for _ in range(n):
        col: Any = tuple(int(v) for v in rng.integers(0, 256, 3))
        if mask:
            col = 255
        kind = rng.integers(0, 4)
        width = 1 if thin else int(rng.integers(1, 4))
        if kind == 0:  # straight line
            p = rng.uniform(-0.1 * size, 1.1 * size, 4)
            draw.line([(p[0], p[1]), (p[2], p[3])], fill=col, width=width)
        elif kind == 1:  # open zigzag
            k = int(rng.integers(3, 7))
            start = rng.uniform(0, size, 2)
            steps = rng.normal(0, size * 0.08, (k, 2))
            pts = np.cumsum(np.vstack([start, steps]), axis=0)
            draw.line([tuple(map(float, q)) for q in pts], fill=col, width=width)
        elif kind == 2:  # open arc (never a closed ring)
            c = rng.uniform(0, size, 2)
            rx, ry = rng.uniform(6, size * 0.3, 2)
            a0 = float(rng.uniform(0, 360))
            draw.arc([c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry], a0, a0 + float(rng.uniform(40, 220)), fill=col,
                     width=width)
        else:  # dots, smaller than the smallest object
            for _ in range(int(rng.integers(1, 6))):
                c = rng.uniform(0, size, 2)
                rad = float(rng.uniform(0.8, 2.2))
                draw.ellipse([c[0] - rad, c[1] - rad, c[0] + rad, c[1] + rad], fill=col)


def render_shapes_image(seed: int, split: str, index: int, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, list[dict]]:
    """Render one image: (H x W x 3 uint8 array, objects ``{"category": name, "bbox": [x, y, w, h], "area": n}``)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODE)}, got {split!r}")
    rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])
    img = _background(rng, size)

    pil = Image.fromarray(np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)))
    _distractors(rng, ImageDraw.Draw(pil), size, int(rng.integers(2, 14)), thin=False)
    img = np.asarray(pil).transpose(2, 0, 1).astype(np.float32)  # 3 x H x W

    n_obj = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    idmap = np.zeros((size, size), dtype=np.int32)  # 0 = background, k = object k (1-based)
    full_area: list[int] = []
    boxes_drawn: list[tuple[int, int, int, int]] = []
    visible: list[int] = []
    classes: list[str] = []
    max_d = size / 2.0
    for _ in range(n_obj):
        for _attempt in range(25):
            cls = SHAPE_CLASSES[int(rng.integers(0, len(SHAPE_CLASSES)))]
            d = float(math.exp(rng.uniform(math.log(MIN_OBJECT), math.log(max_d))))
            r = d / 2
            cx, cy = rng.uniform(0.3 * r, size - 0.3 * r, 2)
            theta = float(rng.uniform(0, 2 * math.pi))
            x0, y0 = max(int(math.floor(cx - r)) - 1, 0), max(int(math.floor(cy - r)) - 1, 0)
            x1, y1 = min(int(math.ceil(cx + r)) + 2, size), min(int(math.ceil(cy + r)) + 2, size)
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            m = Image.new("L", (x1 - x0, y1 - y0), 0)
            md = ImageDraw.Draw(m)
            poly = _polygon(cls, cx - x0, cy - y0, r, theta)
            if poly is None:
                md.ellipse([cx - x0 - r, cy - y0 - r, cx - x0 + r, cy - y0 + r], fill=255)
            else:
                md.polygon(poly, fill=255)
            mask = np.asarray(m) > 127
            area = int(mask.sum())
            if area < 12:
                continue
            # occlusion: every earlier object keeps at least MIN_VISIBLE of its area
            covered = np.bincount(idmap[y0:y1, x0:x1][mask], minlength=len(classes) + 1)
            if any(visible[k] - covered[k + 1] < MIN_VISIBLE * full_area[k] for k in range(len(classes))):
                continue
            region = img[:, y0:y1, x0:x1]
            under = region[:, mask].mean(axis=1)
            base = _color(rng)
            for _ in range(6):  # a colour that stands out from what lies under it
                if float(np.abs(base - under).sum()) > 150:
                    break
                base = _color(rng)
            else:
                base = np.where(under > 127, under - 120, under + 120).astype(np.float32)
            tex = _fill(rng, base, x0, y0, x1, y1)
            region[:, mask] = tex[:, mask]
            for k in range(len(classes)):
                visible[k] -= int(covered[k + 1])
            idmap[y0:y1, x0:x1][mask] = len(classes) + 1
            classes.append(cls)
            boxes_drawn.append((x0, y0, x1, y1))
            full_area.append(area)
            visible.append(area)
            break

    grain = rng.uniform(0, 6)
    if grain > 1:
        img += _noise(rng, (size, size), grain)[None]
    pil = Image.fromarray(np.ascontiguousarray(np.clip(img + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)))
    n_over = int(rng.integers(0, 4))
    if n_over and classes:
        over = Image.new("L", (size, size), 0)
        # draw the same thin clutter on the picture and on a mask (same rng draws: replay a copied generator)
        state = rng.bit_generator.state
        _distractors(rng, ImageDraw.Draw(pil), size, n_over, thin=True)
        rng2 = np.random.default_rng()
        rng2.bit_generator.state = state
        _distractors(rng2, ImageDraw.Draw(over), size, n_over, thin=True, mask=True)
        idmap[np.asarray(over) > 0] = 0
    elif n_over:
        _distractors(rng, ImageDraw.Draw(pil), size, n_over, thin=True)
    out = np.asarray(pil)

    objects = []
    for k, cls in enumerate(classes):
        x0, y0, x1, y1 = boxes_drawn[k]
        vis = idmap[y0:y1, x0:x1] == k + 1
        cols, rows = np.flatnonzero(vis.any(axis=0)), np.flatnonzero(vis.any(axis=1))
        if len(cols) == 0:
            continue
        xa, xb, ya, yb = x0 + int(cols[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[0]), y0 + int(rows[-1]) + 1
        objects.append({"category": cls, "bbox": [xa, ya, xb - xa, yb - ya], "area": int(vis.sum())})
    return out, objects


# --------------------------------------------------------------------------------------------- writing


def shapes_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split of a shapes set."""
    root = Path(root)
    return root / split, root / "annotations" / f"instances_{split}.json"


def _write_split(root: Path, split: str, n: int, size: int, seed: int,
                 progress: Callable[[str, int, int], None] | None) -> None:
    img_dir, ann_file = shapes_paths(root, split)
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    cat_id = {c: i + 1 for i, c in enumerate(SHAPE_CLASSES)}
    images, anns = [], []
    for i in range(n):
        arr, objs = render_shapes_image(seed, split, i, size)
        fn = f"{i:06d}.jpg"
        Image.fromarray(arr).save(img_dir / fn, format="JPEG", quality=JPEG_QUALITY)
        images.append({"id": i + 1, "file_name": fn, "width": size, "height": size})
        for o in objs:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_id[o["category"]],
                         "bbox": o["bbox"], "area": o["area"], "iscrowd": 0})
        if progress is not None:
            progress(split, i + 1, n)
    coco = {
        "info": {"description": f"vertebra shapes ({split})", "version": str(VERSION), "seed": seed, "size": size},
        "images": images,
        "annotations": anns,
        "categories": [{"id": cat_id[c], "name": c, "supercategory": "shape"} for c in SHAPE_CLASSES],
    }
    ann_file.write_text(json.dumps(coco, separators=(",", ":")) + "\n", encoding="utf-8")


def _is_shapes_set(p: Path) -> bool:
    try:
        return json.loads((p / "shapes.json").read_text()).get("generator") == "vertebra.data.shapes"
    except (OSError, ValueError, AttributeError):
        return False


def write_shapes(
    out_dir: str | os.PathLike,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write the shapes set to ``out_dir`` (see the module docstring for the layout); returns ``out_dir``.

    ``out_dir`` must not exist or be empty; an existing shapes set is replaced only with ``overwrite=True``,
    and a non-empty folder that is not a shapes set is never touched. ``progress(split, done, total)`` is
    called after each image.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if size < 32:
        raise ValueError(f"size must be >= 32 px, got {size}")
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a folder")
        if any(out.iterdir()):
            if not _is_shapes_set(out):
                raise FileExistsError(f"{out}: folder is not empty and holds no shapes set; choose another --out")
            if not overwrite:
                raise FileExistsError(f"{out}: a shapes set is already there; pass overwrite=True (--overwrite) "
                                      "to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        _write_split(tmp, "train", num_train, size, seed, progress)
        _write_split(tmp, "val", num_val, size, seed, progress)
        meta = {"generator": "vertebra.data.shapes", "version": VERSION, "seed": seed, "size": size,
                "num_train": num_train, "num_val": num_val, "classes": list(SHAPE_CLASSES),
                "layout": {"train": ["train/", "annotations/instances_train.json"],
                           "val": ["val/", "annotations/instances_val.json"]}}
        (tmp / "shapes.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            if any(out.iterdir()):
                shutil.rmtree(out)
            else:
                out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_shapes(root: str | os.PathLike, split: str = "train", transforms: Callable | None = None, **kwargs: Any):
    """The COCO dataset over a split of a shapes set written by :func:`write_shapes`."""
    from .coco import CocoDetection

    img_dir, ann_file = shapes_paths(root, split)
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: not found; write the set first with `vertebra data shapes --out {root}`"
                                " or vertebra.data.write_shapes")
    return CocoDetection(img_dir, ann_file, transforms, **kwargs)
