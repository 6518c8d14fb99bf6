"""Write a COCO detection set unlike the built-in shapes set, to try ``vertebra train``'s defaults on data nobody
tuned them for: real photographs as backgrounds (random crops, flips, scales and colour shifts of the photos given,
by default the ones that ship with matplotlib and Rust's documentation where present), small objects (4-48 px on
images of 320 x 240, 240 x 320 or 400 x 300 px, 2-14 per image, partly overlapping), elongated ones (bars of aspect
ratio 1:3 to 1:6), five classes drawn unlike the shapes set's (bar, ring, checker, arrow, dots) and category ids that
are not contiguous (3, 8, 15, 27, 42).

    python benchmarks/make_photo_coco.py --out data/photo_coco             # 1000 train + 200 val images
    vertebra data stats --coco data/photo_coco/annotations/instances_train.json --images data/photo_coco/train
    vertebra train --coco data/photo_coco/annotations/instances_train.json --images data/photo_coco/train \\
        --val-coco data/photo_coco/annotations/instances_val.json --val-images data/photo_coco/val \\
        --backbone resnet18 --max-minutes 20
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

CATEGORIES = [(3, "bar"), (8, "ring"), (15, "checker"), (27, "arrow"), (42, "dots")]
SIZES = [(320, 240), (240, 320), (400, 300)]


def _default_photos() -> list[Path]:
    import matplotlib

    found = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    for p in Path.home().glob(".rustup/toolchains/*/share/doc/rust/html/embedded-book/assets/*.jp*g"):
        found.append(p)
    return [p for p in found if p.is_file()]


def _background(photos: list[Image.Image], w: int, h: int, rng: random.Random) -> Image.Image:
    src = rng.choice(photos)
    scale = rng.uniform(0.35, 1.0)
    cw, ch = int(src.width * scale), int(src.height * scale)
    cw, ch = max(cw, 32), max(ch, 32)
    x, y = rng.randint(0, src.width - cw), rng.randint(0, src.height - ch)
    img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.4, 1.4))
    return ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.3))


def _color(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.choice((rng.randint(0, 60), rng.randint(200, 255))) for _ in range(3))


def _draw(d: ImageDraw.ImageDraw, cat: str, x: int, y: int, w: int, h: int, rng: random.Random) -> None:
    c = _color(rng)
    if cat == "bar":
        d.rectangle([x, y, x + w - 1, y + h - 1], fill=c, outline=(0, 0, 0))
    elif cat == "ring":
        t = max(2, min(w, h) // 5)
        d.ellipse([x, y, x + w - 1, y + h - 1], outline=c, width=t)
    elif cat == "checker":
        n = 4
        for i in range(n):
            for j in range(n):
                fill = c if (i + j) % 2 == 0 else (255 - c[0], 255 - c[1], 255 - c[2])
                d.rectangle([x + i * w // n, y + j * h // n, x + (i + 1) * w // n - 1, y + (j + 1) * h // n - 1],
                            fill=fill)
    elif cat == "arrow":
        mid = y + h // 2
        d.rectangle([x, mid - max(1, h // 6), x + (2 * w) // 3, mid + max(1, h // 6)], fill=c)
        d.polygon([(x + (2 * w) // 3 - 1, y), (x + w - 1, mid), (x + (2 * w) // 3 - 1, y + h - 1)], fill=c)
    else:  # dots: a 3 x 3 grid of discs
        r = max(1, min(w, h) // 8)
        for i in range(3):
            for j in range(3):
                cx, cy = x + (2 * i + 1) * w // 6, y + (2 * j + 1) * h // 6
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)


def _box_size(cat: str, rng: random.Random) -> tuple[int, int]:
    s = int(round(math.exp(rng.uniform(math.log(6), math.log(44)))))
    if cat in ("bar", "arrow"):
        ratio = rng.uniform(3.0, 6.0) if cat == "bar" else rng.uniform(1.6, 2.4)
        long, short = s, max(3, int(round(s / ratio)))
        return (long, short) if rng.random() < 0.5 or cat == "arrow" else (short, long)
    return s, s


def write_split(out: Path, split: str, n: int, photos: list[Image.Image], seed: int) -> dict:
    rng = random.Random(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k in range(n):
        w, h = rng.choice(SIZES)
        img = _background(photos, w, h, rng)
        d = ImageDraw.Draw(img)
        for _ in range(rng.randint(2, 14)):
            cid, cat = rng.choice(CATEGORIES)
            bw, bh = _box_size(cat, rng)
            if bw >= w - 2 or bh >= h - 2:
                continue
            x, y = rng.randint(0, w - bw - 1), rng.randint(0, h - bh - 1)
            _draw(d, cat, x, y, bw, bh, rng)
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": cid, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        name = f"{k:06d}.jpg"
        img.save(out / split / name, quality=90)
        images.append({"id": k + 1, "file_name": name, "width": w, "height": h})
    cats = [{"id": cid, "name": name, "supercategory": "object"} for cid, name in CATEGORIES]
    ann = {"images": images, "annotations": anns, "categories": cats}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))
    return ann


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/photo_coco")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--photos", nargs="*", default=None, help="background photographs (default: those found here)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.photos] if args.photos else _default_photos()
    if not paths:
        p.error("no photographs found: give some with --photos")
    photos = [Image.open(x).convert("RGB") for x in paths]
    out = Path(args.out)
    for split, n, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        ann = write_split(out, split, n, photos, seed)
        print(f"{split}: {len(ann['images'])} images, {len(ann['annotations'])} boxes -> {out / split}")
    print(f"backgrounds from: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
