"""The data layer: readers, bad-input handling, transforms, the shapes set. CPU, seconds, files in tmp_path."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from vertebra.cli import main as cli_main
from vertebra.data import (
    CIFAR,
    CIFAR10,
    CIFAR100,
    SHAPE_CLASSES,
    VOC_CLASSES,
    CocoDetection,
    DataError,
    ImageError,
    ImageFolder,
    MissingImageError,
    VOCDetection,
    classification_transforms,
    collate_classification,
    collate_detection,
    detection_transforms,
    load_shapes,
    read_image,
    write_shapes,
)

# --------------------------------------------------------------------------------------------- helpers


def _rgb(h=24, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(arr_or_img, path: Path, fmt: str | None = None) -> Path:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def _coco(tmp_path: Path, anns: list[dict], images: list[dict] | None = None, cats: list[dict] | None = None,
          write_images: bool = True) -> tuple[Path, Path]:
    img_dir = tmp_path / "images"
    images = images if images is not None else [
        {"id": 3, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 5, "file_name": "b.png", "width": 40, "height": 30},
    ]
    cats = cats if cats is not None else [{"id": 7, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 11, "name": "cow"}]
    if write_images:
        for im in images:
            if isinstance(im, dict) and isinstance(im.get("file_name"), str):
                _save(_rgb(im["height"], im["width"], seed=im["id"]), img_dir / im["file_name"])
    ann_file = tmp_path / "annotations.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return img_dir, ann_file


def _ann(aid, image_id, cat, bbox, **kw):
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0, **kw}


# --------------------------------------------------------------------------------------------- decoding


def test_read_image_rgb_jpeg(tmp_path):
    p = _save(_rgb(), tmp_path / "x.jpg")
    img = read_image(p)
    assert isinstance(img, tv_tensors.Image)
    assert img.shape == (3, 24, 32) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_read_image_grayscale_to_rgb(tmp_path):
    g = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) % 256
    p = _save(g.astype(np.uint8), tmp_path / "g.png")
    img = read_image(p)
    assert img.shape == (3, 24, 32)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert torch.allclose(img[0], torch.from_numpy(g.astype(np.float32) / 255))


def test_read_image_rgba_drops_alpha(tmp_path):
    rgba = np.concatenate([_rgb(), np.full((24, 32, 1), 17, np.uint8)], axis=2)
    p = _save(rgba, tmp_path / "a.png")
    img = read_image(p)
    assert img.shape == (3, 24, 32)
    assert torch.allclose(img, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_read_image_16bit(tmp_path, fmt):
    g = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)  # up to 65195
    p = _save(Image.fromarray(g), tmp_path / f"g16.{fmt.lower()}", fmt)
    img = read_image(p)
    assert img.shape == (3, 24, 32)
    assert torch.allclose(img[1], torch.from_numpy(g.astype(np.float32) / 65535), atol=1e-6)
    assert float(img.max()) > 0.99  # scaled by 65535, not 255 (which would saturate) nor left raw


def test_read_image_cmyk_jpeg(tmp_path):
    a = _rgb()
    p = _save(Image.fromarray(a).convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG")
    img = read_image(p)
    ref = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255
    assert img.shape == (3, 24, 32) and np.abs(img.permute(1, 2, 0).numpy() - ref).mean() < 0.02


def test_read_image_pil_fallback_bmp(tmp_path):
    a = _rgb()
    img = read_image(_save(a, tmp_path / "x.bmp"))
    assert torch.allclose(img, torch.from_numpy(a).permute(2, 0, 1).float() / 255)


def test_read_image_truncated_and_corrupt(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"trunc\.jpg: cannot decode image"):
        read_image(trunc)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match="junk.png"):
        read_image(junk)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_image(empty)


def test_read_image_missing(tmp_path):
    with pytest.raises(MissingImageError, match="nope.jpg: image file not found") as ei:
        read_image(tmp_path / "nope.jpg")
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, ValueError)


# --------------------------------------------------------------------------------------------- COCO


def test_coco_reads_and_maps_categories(tmp_path):
    anns = [
        _ann(1, 3, 7, [2, 3, 10, 5]),
        _ann(2, 3, 11, [30, 20, 20, 20]),  # partly outside (x2 = 50 > 40): clipped and counted
        _ann(3, 3, 2, [0, 0, 40, 30], iscrowd=1),  # crowd: left out by default
    ]
    img_dir, ann_file = _coco(tmp_path, anns)
    ds = CocoDetection(img_dir, ann_file)
    assert ds.categories == ["dog", "cat", "cow"]  # sorted by id: 2, 7, 11
    assert ds.label_to_category_id == {0: 2, 1: 7, 2: 11}
    assert ds.category_id_to_label == {2: 0, 7: 1, 11: 2}
    assert len(ds) == 2 and ds.clipped == 1 and ds.ignored_crowd == 1 and not ds.skipped
    img, tgt = ds[0]
    assert isinstance(img, tv_tensors.Image) and img.shape == (3, 30, 40)
    assert isinstance(tgt["boxes"], tv_tensors.BoundingBoxes) and tgt["boxes"].format.name == "XYXY"
    assert tgt["boxes"].tolist() == [[2, 3, 12, 8], [30, 20, 40, 30]]
    assert tgt["labels"].dtype == torch.int64 and tgt["labels"].tolist() == [1, 2]
    assert tgt["image_id"] == 3 and tgt["orig_size"] == (30, 40)
    img, tgt = ds[1]  # an image without annotations is valid
    assert tgt["boxes"].shape == (0, 4) and tgt["labels"].shape == (0,)
    crowd = CocoDetection(img_dir, ann_file, include_crowd=True)
    assert crowd[0][1]["iscrowd"].tolist() == [False, False, True]
    gt = ds.coco_ground_truth()
    assert len(gt["images"]) == 2 and len(gt["annotations"]) == 2 and gt["annotations"][0]["bbox"] == [2, 3, 10, 5]


BAD_ANNOTATIONS = [
    (_ann(17, 3, 7, [5, 5, -4, 3]), r"annotation id 17 \(image 3\): bbox width -4 < 0", "negative box size"),
    (_ann(18, 3, 7, [5, 5, 4, -1]), r"annotation id 18 \(image 3\): bbox height -1 < 0", "negative box size"),
    (_ann(19, 3, 7, [5, 5, 0, 3]), r"annotation id 19 \(image 3\): bbox .* zero width", "zero-area box"),
    (_ann(20, 3, 7, [50, 5, 4, 3]), r"annotation id 20 .* entirely outside the 40x30 image", "box outside image"),
    (_ann(21, 3, 99, [5, 5, 4, 3]), r"annotation id 21 .* unknown category_id 99", "unknown category id"),
    (_ann(22, 42, 7, [5, 5, 4, 3]), r"annotation id 22 .* unknown image_id 42", "unknown image id"),
    (_ann(23, 3, 7, [5, 5, 4]), r"annotation id 23 .* bbox must be \[x, y, width, height\]", "bad bbox"),
]


@pytest.mark.parametrize("bad,match,reason", BAD_ANNOTATIONS, ids=[b[2] + str(b[0]["id"]) for b in BAD_ANNOTATIONS])
def test_coco_bad_annotation(tmp_path, caplog, bad, match, reason):
    img_dir, ann_file = _coco(tmp_path, [_ann(1, 3, 7, [1, 1, 5, 5]), bad])
    with pytest.raises(DataError, match=r"annotations\.json: " + match):
        CocoDetection(img_dir, ann_file)
    with caplog.at_level(logging.WARNING, logger="vertebra.data"):
        ds = CocoDetection(img_dir, ann_file, skip_bad=True)
    assert ds.skipped == {reason: 1}
    assert ds[0][1]["boxes"].shape == (1, 4)  # the good annotation stays
    msgs = [r.getMessage() for r in caplog.records if r.name == "vertebra.data"]
    assert any(f"annotation id {bad['id']}" in m for m in msgs)
    assert any(f"annotations.json: skipped 1 ({reason}: 1)" in m for m in msgs)  # the summary line


def test_coco_malformed_json(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line 1 column"):
        CocoDetection(tmp_path, f)
    f.write_text('{"annotations": []}')
    with pytest.raises(DataError, match=r"broken\.json: missing field 'images'"):
        CocoDetection(tmp_path, f)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        CocoDetection(tmp_path, tmp_path / "absent.json")


def test_coco_bad_image_entry(tmp_path):
    images = [{"id": 3, "file_name": "a.jpg", "width": 40, "height": 30},
              {"id": 4, "file_name": "c.jpg", "width": -1, "height": 30}]
    img_dir, ann_file = _coco(tmp_path, [_ann(1, 4, 7, [1, 1, 5, 5])], images=images, write_images=False)
    with pytest.raises(DataError, match=r"image id 4 \(c\.jpg\): 'width' must be an integer in \[1, 1048576\], got -1"):
        CocoDetection(img_dir, ann_file)
    ds = CocoDetection(img_dir, ann_file, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"bad image entry": 1, "annotation of skipped image": 1}


@pytest.mark.parametrize("problem", ["missing", "corrupt", "truncated", "size"])
def test_coco_bad_image_file_lazily(tmp_path, caplog, problem):
    img_dir, ann_file = _coco(tmp_path, [_ann(1, 3, 7, [1, 1, 5, 5]), _ann(2, 5, 2, [2, 2, 5, 5])])
    a = img_dir / "a.jpg"
    if problem == "missing":
        a.unlink()
    elif problem == "corrupt":
        a.write_bytes(b"\x00" * 100)
    elif problem == "truncated":
        a.write_bytes(a.read_bytes()[:200])
    else:
        _save(_rgb(30, 41), a, "JPEG")
    ds = CocoDetection(img_dir, ann_file)  # images are not read at construction
    err = MissingImageError if problem == "missing" else ImageError
    with pytest.raises(err, match=r"a\.jpg"):
        ds[0]
    assert ds[1][1]["image_id"] == 5
    ds = CocoDetection(img_dir, ann_file, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="vertebra.data"):
        img, tgt = ds[0]
    assert tgt["image_id"] == 5  # the next valid image stands in
    reason = {"missing": "missing image", "size": "image size mismatch"}.get(problem, "corrupt image")
    assert ds.skipped == {reason: 1}
    assert any("a.jpg" in r.getMessage() for r in caplog.records)
    ds[0]
    assert ds.skipped == {reason: 1}  # a known-bad index is not re-read nor re-counted


def test_coco_all_images_bad(tmp_path):
    img_dir, ann_file = _coco(tmp_path, [], write_images=False)
    ds = CocoDetection(img_dir, ann_file, skip_bad=True)
    with pytest.raises(DataError, match="no image could be loaded"):
        ds[0]


# --------------------------------------------------------------------------------------------- VOC


def _voc_xml(objects, size=(40, 30), filename=None) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objects
    )
    fn = f"<filename>{filename}</filename>" if filename else ""
    sz = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation>{fn}{sz}{objs}</annotation>"


def _voc(tmp_path: Path, entries: dict[str, str], split="train") -> Path:
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for i, (name, xml) in enumerate(entries.items()):
        (root / "Annotations" / f"{name}.xml").write_text(xml)
        _save(_rgb(30, 40, seed=i), root / "JPEGImages" / f"{name}.jpg")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root


def test_voc_reads(tmp_path):
    root = _voc(tmp_path, {
        "000005": _voc_xml([("dog", 0, (1, 1, 10, 20)), ("person", 1, (5, 6, 45, 30))]),
        "2008_000123": _voc_xml([], size=None),  # no <size>: read from the image header
    })
    ds = VOCDetection(root, "train")
    assert ds.categories == list(VOC_CLASSES) and ds.label_to_category_id[11] == "dog"
    img, tgt = ds[0]
    assert img.shape == (3, 30, 40)
    assert tgt["boxes"].tolist() == [[0, 0, 10, 20], [4, 5, 40, 30]]  # 1-based inclusive -> 0-based; clipped
    assert tgt["labels"].tolist() == [11, 14]
    assert tgt["difficult"].tolist() == [False, True]
    assert tgt["image_id"] == 5 and ds.clipped == 1
    assert ds[1][1]["image_id"] == 2008000123 and ds.image_names == ["000005", "2008_000123"]
    assert VOCDetection(root, "train", keep_difficult=False)[0][1]["labels"].tolist() == [11]
    t = detection_transforms(True, 20)(img, tgt)[1]
    assert len(t["labels"]) == len(t["difficult"]) == len(t["boxes"])


@pytest.mark.parametrize("xml,match,reason", [
    ("<annotation><size>", "malformed XML", "malformed XML"),
    (_voc_xml([("dog", 0, (12, 1, 10, 20))]), r"object 0 \(dog\): xmax 10 < xmin 12", "box x2 < x1"),
    (_voc_xml([("dragon", 0, (1, 1, 10, 20))]), r"object 0 \(dragon\): unknown class 'dragon'", "unknown category"),
    (_voc_xml([("dog", 0, (50, 1, 60, 20))]), r"entirely outside the 40x30 image", "box outside image"),
    (_voc_xml([("dog", 0, (1, 1, "ten", 20))]), r"<xmax> must be a number, got 'ten'", "malformed XML"),
])
def test_voc_bad(tmp_path, xml, match, reason):
    root = _voc(tmp_path, {"000001": _voc_xml([("cat", 0, (1, 1, 5, 5))]), "000002": xml})
    with pytest.raises(DataError, match=r"000002\.xml.*" + match):
        VOCDetection(root, "train")
    ds = VOCDetection(root, "train", skip_bad=True)
    assert ds.skipped == {reason: 1}


def test_voc_missing_split(tmp_path):
    root = _voc(tmp_path, {"000001": _voc_xml([])})
    with pytest.raises(FileNotFoundError, match=r"val\.txt: split file not found \(splits here: \['train'\]\)"):
        VOCDetection(root, "val")


# --------------------------------------------------------------------------------------------- folder, CIFAR


def test_image_folder(tmp_path, caplog):
    _save(_rgb(seed=1), tmp_path / "b_class" / "1.jpg")
    _save(_rgb(seed=2)[..., 0], tmp_path / "a_class" / "sub" / "2.png")  # grayscale, nested
    (tmp_path / "a_class" / "3.jpg").write_bytes(b"garbage")
    (tmp_path / "a_class" / "notes.txt").write_text("ignored")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["a_class", "b_class"] and len(ds) == 3
    with pytest.raises(ImageError, match=r"3\.jpg"):
        ds[0]
    ds = ImageFolder(tmp_path, classification_transforms(False, 16), skip_bad=True)
    img, label = ds[0]
    assert img.shape == (3, 16, 16) and label == 0 and ds.skipped == {"corrupt image": 1}
    x, y = collate_classification([ds[1], ds[2]])
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]


def _write_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def test_cifar10_and_100(tmp_path):
    d10 = tmp_path / "cifar-10-batches-py"
    d10.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write_pickle(d10 / f"data_batch_{i}", {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                                                 b"labels": [i % 10, 1, 2, 3]})
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    _write_pickle(d10 / "test_batch", {b"data": test, b"labels": [9, 8, 7]})
    _write_pickle(d10 / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    ds = CIFAR10(tmp_path, train=True)
    assert len(ds) == 20 and ds.classes[3] == "c3"
    te = CIFAR(d10, train=False)
    img, lab = te[1]
    assert isinstance(img, tv_tensors.Image) and img.shape == (3, 32, 32) and lab == 8
    assert torch.allclose(img, torch.from_numpy(test[1].reshape(3, 32, 32)).float() / 255)

    d100 = tmp_path / "c100" / "cifar-100-python"
    d100.mkdir(parents=True)
    for split, n in (("train", 5), ("test", 2)):
        _write_pickle(d100 / split, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                     b"fine_labels": list(range(n)), b"coarse_labels": [1] * n})
    _write_pickle(d100 / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                  b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})
    ds = CIFAR100(tmp_path / "c100")
    assert len(ds) == 5 and ds.num_classes == 100 and ds[4][1] == 4
    assert CIFAR100(d100, train=False, coarse=True)[0][1] == 1


def test_cifar_refuses_code_and_bad_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    _write_pickle(d / "batches.meta", {b"label_names": [b"a"] * 10})
    for i in range(1, 6):
        _write_pickle(d / f"data_batch_{i}", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    (d / "data_batch_2").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2: not a readable CIFAR python batch .*refused global"):
        CIFAR10(tmp_path)
    _write_pickle(d / "data_batch_2", {b"data": np.zeros((1, 100), np.uint8), b"labels": [0]})
    with pytest.raises(DataError, match=r"data_batch_2: field 'data' must be uint8 N x 3072"):
        CIFAR10(tmp_path)
    with pytest.raises(FileNotFoundError, match="no CIFAR python batches"):
        CIFAR100(tmp_path)


# --------------------------------------------------------------------------------------------- transforms


def _target(boxes, labels, h=100, w=200):
    return {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY",
                                          canvas_size=(h, w)),
        "labels": torch.tensor(labels),
        "difficult": torch.tensor([False, True, False][: len(labels)]),
        "image_id": 1,
        "orig_size": (h, w),
    }


def test_detection_transforms_eval_resize_keeps_aspect():
    t = detection_transforms(False, 50, max_size=80)
    img, tgt = t(tv_tensors.Image(torch.rand(3, 100, 200)), _target([[10, 10, 50, 50]], [1]))
    assert img.shape == (3, 40, 80)  # shorter side 50 would make the longer 100 > 80: capped
    assert tgt["boxes"].tolist() == [[4, 4, 20, 20]] and tgt["boxes"].canvas_size == (40, 80)
    assert tgt["orig_size"] == (100, 200) and tgt["image_id"] == 1
    img, _ = detection_transforms(False, 50)(tv_tensors.Image(torch.rand(3, 100, 120)), _target([], []))
    assert img.shape == (3, 50, 60)


def test_detection_transforms_train_sanitizes_and_flips():
    torch.manual_seed(0)
    t = detection_transforms(True, 100, photometric=True, hflip=1.0, min_box_size=2.0)
    img0 = tv_tensors.Image(torch.rand(3, 100, 200))
    # the second box is 1 px wide at full size: degenerate after a resize below 2 px -> removed with its label
    img, tgt = t(img0, _target([[10, 10, 50, 50], [100, 0, 101, 80], [150, 20, 190, 90]], [1, 2, 3]))
    assert img.dtype == torch.float32 and min(img.shape[-2:]) in range(75, 126)
    assert tgt["labels"].tolist() == [1, 3] and tgt["difficult"].tolist() == [False, False]
    s = img.shape[-1] / 200
    assert torch.allclose(tgt["boxes"][0], torch.tensor([200 - 50, 10, 200 - 10, 50]) * s, atol=1e-3)  # flipped


def _v2_train_compose(size, *, scale_range, hflip, photometric, min_box_size, max_size=None):
    """The torchvision v2 Compose DetectionTrainTransform stands for."""
    from torchvision.transforms import v2

    from vertebra.data.transforms import box_labels_getter

    max_size = max_size or int(math.ceil(size * 1333 / 800))
    lo, hi = scale_range
    ops = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if photometric:
        ops.append(v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)], p=0.8))
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    sizes = sorted({max(1, int(round(size * (lo + (hi - lo) * k / 8)))) for k in range(9)})
    ops += [v2.RandomShortestSize(min_size=sizes, max_size=int(round(max_size * hi)), antialias=True),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=min_box_size, min_area=min_box_size**2, labels_getter=box_labels_getter)]
    return v2.Compose(ops)


@pytest.mark.parametrize("kw", [
    dict(scale_range=(1.0, 1.0), hflip=0.5, photometric=False, min_box_size=1.0),  # what the presets train with
    dict(scale_range=(0.75, 1.25), hflip=0.5, photometric=True, min_box_size=2.0),
    dict(scale_range=(1.0, 1.0), hflip=0.0, photometric=False, min_box_size=1.0),
])
def test_detection_train_transform_is_the_v2_compose(kw):
    """DetectionTrainTransform gives what the torchvision v2 Compose of the same operations gives, sample for
    sample under the same seed: the same random draws, image, boxes and per-box entries."""
    ours = detection_transforms(True, 64, **kw)
    theirs = _v2_train_compose(64, **kw)
    g = torch.Generator().manual_seed(3)
    for seed in range(12):
        h, w = int(torch.randint(40, 120, (), generator=g)), int(torch.randint(40, 120, (), generator=g))
        img = tv_tensors.Image((torch.rand(3, h, w, generator=g) * 255).to(torch.uint8))
        xy = torch.rand(6, 2, generator=g) * torch.tensor([w, h])
        wh = torch.rand(6, 2, generator=g) * 30 + torch.tensor([0.2, 0.2])  # some boxes thin enough to be removed
        boxes = torch.cat([xy, xy + wh], 1).tolist()
        tgt = _target(boxes, list(range(6)), h, w)
        tgt["difficult"] = torch.tensor([False, True] * 3)
        outs = []
        for t in (ours, theirs):
            torch.manual_seed(seed)
            outs.append(t(img, {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in tgt.items()}))
        (a_img, a_tgt), (b_img, b_tgt) = outs
        assert torch.equal(a_img, b_img)
        assert isinstance(a_tgt["boxes"], tv_tensors.BoundingBoxes) and a_tgt["boxes"].canvas_size == \
            b_tgt["boxes"].canvas_size
        assert torch.equal(a_tgt["boxes"], b_tgt["boxes"])
        for k in ("labels", "difficult"):
            assert torch.equal(a_tgt[k], b_tgt[k])
        assert a_tgt["image_id"] == b_tgt["image_id"] and a_tgt["orig_size"] == b_tgt["orig_size"]


def test_classification_transforms_sizes():
    x = tv_tensors.Image(torch.rand(3, 40, 50))
    assert classification_transforms(True, 32)(x).shape == (3, 32, 32)
    assert classification_transforms(False, 32)(x).shape == (3, 32, 32)
    assert classification_transforms(True, 72)(x).shape == (3, 72, 72)
    y = classification_transforms(False, 72, mean=(0.5,) * 3, std=(0.25,) * 3)(x)
    assert y.shape == (3, 72, 72) and float(y.min()) < 0


def test_collate_detection_keeps_lists():
    batch = [(torch.zeros(3, 4, 5), {"a": 1}), (torch.zeros(3, 6, 7), {"a": 2})]
    imgs, tgts = collate_detection(batch)
    assert isinstance(imgs, list) and [i.shape[-1] for i in imgs] == [5, 7] and tgts == [{"a": 1}, {"a": 2}]


# --------------------------------------------------------------------------------------------- shapes


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_deterministic_and_loadable(tmp_path):
    a = write_shapes(tmp_path / "a", num_train=12, num_val=4, size=96, seed=3)
    b = write_shapes(tmp_path / "b", num_train=12, num_val=4, size=96, seed=3)
    ha, hb = _hashes(a), _hashes(b)
    assert len(ha) == 12 + 4 + 3 and ha == hb  # byte-identical for the same seed
    c = write_shapes(tmp_path / "c", num_train=6, num_val=0, size=96, seed=4)
    assert _hashes(c)["train/000000.jpg"] != ha["train/000000.jpg"]
    d = write_shapes(tmp_path / "d", num_train=6, num_val=0, size=96, seed=3)  # a prefix of the same stream
    assert all(_hashes(d)[f"train/{i:06d}.jpg"] == ha[f"train/{i:06d}.jpg"] for i in range(6))
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind

    ds = load_shapes(a, "train")
    assert ds.categories == list(SHAPE_CLASSES) and ds.label_to_category_id == {i: i + 1 for i in range(6)}
    assert not ds.skipped and ds.clipped == 0
    n_boxes = 0
    for rec in ds.records:
        assert (rec.boxes[:, :2] >= 0).all() and (rec.boxes[:, 2:] <= 96).all()
        assert ((rec.boxes[:, 2:] - rec.boxes[:, :2]) >= 1).all()
        n_boxes += len(rec.labels)
    assert n_boxes > 12
    img, tgt = ds[0]
    assert img.shape == (3, 96, 96) and bool((tgt["labels"] < 6).all())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_detection)
    imgs, tgts = next(iter(loader))
    assert len(imgs) == len(tgts) == 4
    assert len(load_shapes(a, "val")) == 4


def main_shapes(argv):
    return cli_main(["data", "shapes", *argv])


def test_shapes_cli_and_existing_dir(tmp_path, capsys):
    out = tmp_path / "s"
    assert main_shapes(["--out", str(out), "--train", "3", "--val", "2", "--size", "64", "--seed", "1"]) == 0
    meta = json.loads((out / "shapes.json").read_text())
    assert meta["num_train"] == 3 and meta["size"] == 64 and meta["classes"] == list(SHAPE_CLASSES)
    assert len(list((out / "train").glob("*.jpg"))) == 3 and len(list((out / "val").glob("*.jpg"))) == 2
    assert main_shapes(["--out", str(out), "--train", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main_shapes(["--out", str(out), "--train", "2", "--val", "1", "--size", "64", "--overwrite"]) == 0
    assert len(list((out / "train").glob("*.jpg"))) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds no shapes set"):
        write_shapes(other, 1, 1, 64, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep"
    with pytest.raises(FileNotFoundError, match="vertebra data shapes --out"):
        load_shapes(tmp_path / "nothing", "train")
