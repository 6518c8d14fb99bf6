"""Property-based fuzzing (hypothesis) of the data loaders: mutated COCO JSON, mutated Pascal VOC XML, mutated
image bytes.

What is fuzzed:

* COCO: a small valid set (3 real images, 2 categories with non-contiguous ids, 4 annotations) whose JSON is mutated
  (any field at any depth replaced by a random JSON value, keys deleted or added, entries duplicated or spliced),
  then optionally its serialized bytes (truncation, byte flips, inserted and deleted bytes);
* VOC: a VOC year folder with 2 images whose annotation XML is mutated (elements removed, duplicated, renamed,
  texts replaced by random strings / numbers / nan / negatives), given a prologue (entity declarations such as
  billion laughs, an external entity, odd encodings, a BOM), then byte-mutated;
* images: valid PNG / JPEG bytes truncated, flipped, overwritten, given another format's header, their declared
  size changed, emptied or replaced by random bytes; read by ``read_image`` and through a ``CocoDetection``.

The contract: a loader returns valid samples (3 x H x W float32 in 0..1, boxes inside the image with positive
area, labels 0..K-1), counts a skip (``skip_bad=True``), or raises vertebra's ``DataError`` (or a
``FileNotFoundError``) whose message names the file: the annotation file (COCO), the annotation XML or the year
folder (VOC), the image file for image errors. Anything else fails the test; so does an example running longer
than ``TIME_LIMIT_S`` (a hang). With ``skip_bad=True`` only structural errors (not JSON, no ``images`` /
``categories``, bad categories) may still stop a COCO set, nothing may stop a VOC set from being built, and
loading only ever raises "no image could be loaded", when every image is bad. Mutated images are decoded in a forked
child (``Isolated``) under an address-space cap (``MEMORY_CAP``): a native crash is reported instead of ending the
run, and a corrupt header that declares a huge image fails its allocation instead of exhausting the machine.

``test_loaders_bugs_found_by_fuzzing`` pins the inputs that broke a loader before (a segfault in the PNG decoder,
``OverflowError`` / ``LookupError`` / ``RecursionError`` from numbers, encodings and nesting, a box with no area in
float32): each must now meet the contract.

Runs (derandomized, so the same examples every time)::

    .venv/bin/python -m pytest -q tests/test_fuzz.py                               # CI: 60 examples a test, ~5 s
    VERTEBRA_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/test_fuzz.py   # the long hunt (2000: ~3 min)
"""

from __future__ import annotations

import copy
import faulthandler
import io
import json
import os
import pickle
import re
import resource
import select
import signal
import struct
import threading
import time
import traceback
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from vertebra.data import CocoDetection, DataError, ImageError, VOCDetection, read_image

EXAMPLES = int(os.environ.get("VERTEBRA_FUZZ_EXAMPLES", "60"))
TIME_LIMIT_S = 10.0
MEMORY_CAP = 3 << 30  # bytes of address space the decoding child may add to what it maps when forked

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

FUZZ_HALF = settings(FUZZ, max_examples=max(1, EXAMPLES // 2))  # for the test that mutates three images an example

# Build errors that stop a COCO set even with skip_bad=True (DataError.reason).
COCO_STRUCTURAL = {"malformed JSON", "bad category"}

# --------------------------------------------------------------------------------------------- inputs


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _set_size(buf: bytearray, h: int, w: int) -> bytearray:
    """Change (in place; also returned) the size a PNG (IHDR, CRC fixed) or JPEG (first SOF marker) declares."""
    if buf.startswith(b"\x89PNG") and len(buf) >= 33:
        struct.pack_into(">II", buf, 16, w, h)
        struct.pack_into(">I", buf, 29, zlib.crc32(bytes(buf[12:29])))
        return buf
    m = re.search(rb"\xff[\xc0-\xc2]", bytes(buf))
    if m and len(buf) >= m.start() + 9:
        struct.pack_into(">HH", buf, m.start() + 5, h & 0xFFFF, w & 0xFFFF)
    return buf


# --------------------------------------------------------------------------------------------- regressions


@dataclass(frozen=True)
class Regression:
    """An input that once broke a loader: where it goes ("coco" JSON, "voc" XML, "image" bytes) and the input."""

    where: str
    repro: str | bytes


def _coco_text(image: dict | None = None, bbox: list | None = None, raw: str | None = None) -> str:
    """A one-image COCO JSON text for a reproducer (``raw`` replaces the image's width value verbatim)."""
    im = {"id": 1, "file_name": "a.png", "width": 40, "height": 30, **(image or {})}
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": bbox}] if bbox else []
    text = json.dumps({"images": [im], "annotations": anns, "categories": [{"id": 7, "name": "cat"}]})
    return text.replace('"width": 40', f'"width": {raw}') if raw else text


def _voc_text(width: str = "40", height: str = "30", prologue: str = "", filename: str = "000005.jpg") -> str:
    return (f"{prologue}<annotation><filename>{filename}</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size><object><name>dog</name><difficult>0</difficult>"
            "<bndbox><xmin>2</xmin><ymin>3</ymin><xmax>12</xmax><ymax>20</ymax></bndbox></object></annotation>")


# Each broke a loader (raised something other than a DataError naming the file, or crashed) until it was fixed.
REGRESSIONS: dict[str, Regression] = {
    # CocoDetection._parse_images: int(v) of an inf / NaN width (JSON Infinity / NaN): OverflowError, ValueError
    "coco-nonfinite-size": Regression("coco", _coco_text({"width": float("inf")})),
    # an int beyond float range in a bbox (or as a width): OverflowError from the fast path's float64 array
    "coco-int-beyond-float": Regression("coco", _coco_text(bbox=[1, 1, 10**400, 5])),
    # load_coco_json: an integer literal of 5000 digits: ValueError (nesting too deep: RecursionError)
    "coco-json-limits": Regression("coco", _coco_text(raw="4" * 5000)),
    "coco-json-nesting": Regression("coco", _coco_text(raw="[" * 3000 + "]" * 3000)),
    # read_image: a file_name with a NUL byte: ValueError from Path.read_bytes (not skipped with skip_bad either)
    "image-path-not-encodable": Regression("coco", _coco_text({"file_name": "a\u0000.png"})),
    # a box whose x + w rounds back to x (in float64 or in the targets' float32): kept with zero area
    "coco-zero-area-box": Regression("coco", _coco_text(bbox=[30, 1, 1e-15, 5])),
    # VOCDetection._parse_one: a <filename> longer than NAME_MAX: OSError from is_file()
    "voc-long-filename": Regression("voc", _voc_text(filename="9" * 300)),
    # parse_voc_xml: int(float("inf")) of <size><width>: OverflowError
    "voc-nonfinite-size": Regression("voc", _voc_text(width="inf")),
    # an XML declaration naming an unknown encoding: LookupError from the parser
    "voc-unknown-encoding": Regression("voc", _voc_text(prologue='<?xml version="1.0" encoding="bogus"?>')),
    # torchvision 0.29's decode_png (libpng) kills the process with SIGSEGV when the IHDR declares more pixels than
    # the IDAT holds (this 83-byte 300x300 file, made from a valid 40x30 one): PNG now goes to PIL
    "png-decoder-segfault": Regression("image", bytes(_set_size(bytearray(_encode(np.zeros((30, 40, 3), np.uint8),
                                                                                  "PNG")), 300, 300))),
    # a 1 KB JPEG whose header claims 65500x65500 px: torchvision allocated 13 GB; now refused from the header
    "jpeg-declares-huge": Regression("image", bytes(_set_size(bytearray(_encode(np.zeros((30, 40, 3), np.uint8),
                                                                                "JPEG")), 65500, 65500))),
}


# --------------------------------------------------------------------------------------------- guards


@contextmanager
def _time_limit(what: str, seconds: float = TIME_LIMIT_S):
    """Fail (pytest.fail: a BaseException, so no `except Exception` in the loaders swallows it) after `seconds`."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        pytest.fail(f"hang: {what} ran longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _mapped_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmSize:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) * 1024 if m else None


class Isolated:
    """A forked child process that runs check functions, so that a crash in a native decoder (or a hang, or a huge
    allocation) takes down only the child: it is restarted, and the test process reports the failure.

    The child caps its address space at what it maps when forked + ``MEMORY_CAP`` (Linux RLIMIT_AS): without the cap
    a corrupt 1 KB JPEG declaring 65500x65500 px makes read_image allocate ~13 GB (torchvision's decoders have no
    pixel limit; PIL's MAX_IMAGE_PIXELS does not apply to them).
    """

    def __init__(self):
        self.pid: int | None = None

    def _start(self) -> None:
        child_in, parent_out = os.pipe()  # (read end, write end)
        parent_in, child_out = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: serve requests until the pipe closes, never return into pytest
            code = 0
            try:
                os.close(parent_out)
                os.close(parent_in)
                self._serve(child_in, child_out)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(child_in)
        os.close(child_out)
        self.pid, self.send_fd, self.recv_fd = pid, parent_out, parent_in

    @staticmethod
    def _serve(rfd: int, wfd: int) -> None:
        faulthandler.disable()  # a crash is reported by the test process; no dump from pytest's faulthandler here
        torch.set_num_threads(1)  # OpenMP is not fork-safe; one thread never enters a parallel region
        mapped = _mapped_bytes()
        if mapped is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            cap = mapped + MEMORY_CAP
            resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
        with os.fdopen(rfd, "rb") as inp, os.fdopen(wfd, "wb") as out:
            while header := inp.read(8):
                fn, args = pickle.loads(inp.read(struct.unpack(">Q", header)[0]))
                try:
                    reply = ("ok", fn(*args))
                except BaseException:  # an assertion, pytest.fail, or an exception the contract does not allow
                    reply = ("error", traceback.format_exc())
                data = pickle.dumps(reply)
                out.write(struct.pack(">Q", len(data)) + data)
                out.flush()

    def stop(self) -> int | None:
        """Kill the child (if any); its wait status."""
        if self.pid is not None:
            os.close(self.send_fd)
            os.close(self.recv_fd)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            status = os.waitpid(self.pid, 0)[1]
            self.pid = None
            return status
        return None

    def _recv(self, n: int, deadline: float) -> bytes:
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.recv_fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.recv_fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def call(self, fn, *args, label: str = ""):
        """fn(*args) in the child: its return value; a failure, a crash or a hang there fails the test."""
        if self.pid is None:
            self._start()
        data = pickle.dumps((fn, args))
        os.write(self.send_fd, struct.pack(">Q", len(data)) + data)
        deadline = time.monotonic() + TIME_LIMIT_S
        try:
            reply = pickle.loads(self._recv(struct.unpack(">Q", self._recv(8, deadline))[0], deadline))
        except TimeoutError:
            self.stop()
            pytest.fail(f"hang: {fn.__name__} {label} ran longer than {TIME_LIMIT_S:g} s")
        except EOFError:
            status = self.stop()
            sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
            pytest.fail(f"{fn.__name__} killed by {signal.Signals(sig).name if sig else status} {label}",
                        pytrace=False)
        kind, value = reply
        if kind == "error":
            pytest.fail(f"in the isolated child, {fn.__name__} {label}:\n{value}", pytrace=False)
        return value


def _kind(raw: bytes) -> str:
    return "PNG" if raw.startswith(b"\x89PNG") else "JPEG" if raw.startswith(b"\xff\xd8") else f"{raw[:4]!r}"


# --------------------------------------------------------------------------------------------- contract checks


def _names(err: BaseException, *paths) -> None:
    msg = str(err)
    named = any(str(p) in msg or repr(str(p)) in msg for p in paths)  # a name with a NUL byte is shown escaped
    assert named, f"{type(err).__name__} names none of {[str(p) for p in paths]}: {msg}"


def _check_image(img) -> None:
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32, (type(img), getattr(img, "dtype", None))
    assert img.ndim == 3 and img.shape[0] == 3 and img.shape[1] > 0 and img.shape[2] > 0, tuple(img.shape)
    t = img.as_subclass(torch.Tensor)
    assert bool(torch.isfinite(t).all()) and float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def _check_sample(img, tgt: dict, num_classes: int) -> None:
    _check_image(img)
    h, w = img.shape[-2:]
    assert tgt["orig_size"] == (h, w)
    boxes, labels = tgt["boxes"].as_subclass(torch.Tensor), tgt["labels"]
    n = len(labels)
    assert boxes.shape == (n, 4) and boxes.dtype == torch.float32 and labels.dtype == torch.int64
    assert bool(torch.isfinite(boxes).all()), boxes
    x1, y1, x2, y2 = boxes.unbind(1)
    assert bool(((x1 >= 0) & (y1 >= 0) & (x2 <= w) & (y2 <= h)).all()), f"box outside the {w}x{h} image: {boxes}"
    assert bool(((x2 > x1) & (y2 > y1)).all()), f"box without area in the {w}x{h} image: {boxes.tolist()}"
    assert bool(((labels >= 0) & (labels < num_classes)).all()), labels
    for k in ("difficult", "iscrowd"):
        if k in tgt:
            assert tgt[k].shape == (n,) and tgt[k].dtype == torch.bool


def _load_all(ds) -> None:
    """Load every item. Strict: an ImageError naming the image file; skip_bad: only "no valid image", at once."""
    for i in range(len(ds)):
        try:
            img, tgt = ds[i]
        except DataError as e:
            if ds.skip_bad:
                assert e.reason == "no valid image" and i == 0, (i, e.reason, str(e))
                _names(e, ds.name)
                return
            assert isinstance(e, ImageError), f"{type(e).__name__} loading item {i}: {e}"
            _names(e, ds.records[i].path)
            continue
        _check_sample(img, tgt, ds.num_classes)


def _coco_outcome(root: Path, ann: Path, skip_bad: bool):
    """A CocoDetection with every item loaded (checked), or the allowed build error."""
    try:
        ds = CocoDetection(root, ann, skip_bad=skip_bad)
        ds.build_skipped = Counter(ds.skipped)  # before loading adds image skips
    except (DataError, FileNotFoundError) as e:
        _names(e, ann)
        return e
    _load_all(ds)
    return ds


def _voc_outcome(root: Path, xmls: list[Path], skip_bad: bool):
    """A VOCDetection with every item loaded (checked), or the allowed build error."""
    try:
        ds = VOCDetection(root, "trainval", skip_bad=skip_bad)
        ds.build_skipped = Counter(ds.skipped)  # before loading adds image skips
    except (DataError, FileNotFoundError) as e:
        _names(e, *xmls)
        return e
    _load_all(ds)
    return ds


def _image_outcome(path: Path):
    try:
        img = read_image(path)
    except ImageError as e:
        _names(e, path)
        return e
    _check_image(img)
    return img


def _read_image_shape(path: Path) -> tuple[int, ...] | None:
    """(In the isolated child.) read_image's shape, or None for an ImageError naming the file."""
    out = _image_outcome(path)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else None


def _coco_with_images(root: Path, ann: Path, paths: list[Path], sizes: list[tuple[int, int]]) -> None:
    """(In the isolated child.) Strict: each bad image raises an ImageError naming it; skip_bad=True: each bad image
    is counted once, or, all bad, "no image could be loaded"."""
    good = [isinstance(d, torch.Tensor) and tuple(d.shape[-2:]) == hw
            for d, hw in zip(map(_image_outcome, paths), sizes)]
    strict = CocoDetection(root, ann)
    for i, p in enumerate(paths):
        if good[i]:
            _check_sample(*strict[i], strict.num_classes)
        else:
            with pytest.raises(ImageError) as info:
                strict[i]
            _names(info.value, p)
    lenient = CocoDetection(root, ann, skip_bad=True)
    if not any(good):
        with pytest.raises(DataError, match="no image could be loaded") as info:
            lenient[0]
        _names(info.value, ann)
        return
    for i in range(len(lenient)):
        _check_sample(*lenient[i], lenient.num_classes)
    assert sum(lenient.skipped.values()) == good.count(False), (good, lenient.skipped)
    image_reasons = {"corrupt image", "image size mismatch", "unreadable image", "image too large"}
    assert set(lenient.skipped) <= image_reasons, lenient.skipped


# --------------------------------------------------------------------------------------------- fixtures


# (file name, height, width, bytes): an RGB PNG, an RGB JPEG, a grayscale PNG
BASE_IMAGES = [
    ("a.png", 30, 40, _encode(_rgb(30, 40, 1), "PNG")),
    ("b.jpg", 24, 32, _encode(_rgb(24, 32, 2), "JPEG")),
    ("sub/c.png", 16, 20, _encode(_rgb(16, 20, 3)[..., 0], "PNG")),
]

COCO_DOC = {
    "info": {"description": "fuzz"},
    "images": [{"id": i, "file_name": fn, "width": w, "height": h}
               for i, (fn, h, w, _) in zip((3, 5, 9), BASE_IMAGES)],
    "categories": [{"id": 7, "name": "cat"}, {"id": 2, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 3, "category_id": 7, "bbox": [1, 2, 10, 12], "area": 120, "iscrowd": 0},
        {"id": 2, "image_id": 3, "category_id": 2, "bbox": [30.5, 20, 15, 15], "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 5, "category_id": 2, "bbox": [0, 0, 32, 24], "iscrowd": 1},
        {"id": 4, "image_id": 9, "category_id": 7, "bbox": [2, 2, 5.5, 4], "iscrowd": 0},
    ],
}

VOC_NAMES = ["000005", "000007"]
VOC_XML = [
    _voc_text(),
    "<annotation><folder>VOC2007</folder><filename>000007.jpg</filename><size><width>32</width><height>24</height>"
    "<depth>3</depth></size><object><name>person</name><pose>Left</pose><truncated>1</truncated>"
    "<difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>32</xmax><ymax>24</ymax></bndbox></object>"
    "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>5.5</xmin><ymin>4</ymin><xmax>40</xmax>"
    "<ymax>10</ymax></bndbox></object></annotation>",
]


def _write_images(folder: Path, images=BASE_IMAGES) -> list[Path]:
    paths = []
    for fn, _, _, data in images:
        p = folder / fn
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder per module; every example overwrites its files, so nothing accumulates."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def coco_dir(work) -> tuple[Path, Path]:
    root = work / "coco" / "images"
    _write_images(root)
    return root, work / "coco" / "annotations.json"


@pytest.fixture(scope="module")
def voc_dir(work) -> tuple[Path, list[Path]]:
    root = work / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(VOC_NAMES) + "\n")
    _write_images(root / "JPEGImages", [(f"{VOC_NAMES[0]}.jpg", 30, 40, _encode(_rgb(30, 40, 4), "JPEG")),
                                        (f"{VOC_NAMES[1]}.jpg", 24, 32, _encode(_rgb(24, 32, 5), "JPEG"))])
    return root, [root / "Annotations" / f"{n}.xml" for n in VOC_NAMES]


@pytest.fixture(scope="module")
def isolated():
    if not hasattr(os, "fork"):
        pytest.skip("image fuzzing decodes in a forked child (POSIX)")
    worker = Isolated()
    yield worker
    worker.stop()


# --------------------------------------------------------------------------------------------- strategies

_ENTRY_FIELDS = {"images": ["id", "file_name", "width", "height"], "categories": ["id", "name"],
                 "annotations": ["id", "image_id", "category_id", "bbox", "iscrowd"]}
_KEYS = st.sampled_from(sorted({k for ks in _ENTRY_FIELDS.values() for k in ks} | set(_ENTRY_FIELDS)))
_KEYS = _KEYS | st.text(max_size=6)
# values that have broken loaders before: non-finite, beyond float range, tiny widths, odd file names
_NASTY_NUMBERS = st.sampled_from([0, -1, 0.5, 2**31, -(2**63), 2**64, 10**400, -(10**400), float("inf"), float("-inf"),
                                  float("nan"), 1e308, 5e-324, 1e-15, 39.9999999, 29.99999999])
_NASTY_NAMES = st.sampled_from(["", "a.png", "sub", "missing.png", "../coco", "/", ".", "a\u0000.png", "\ud800",
                                "x" * 300])
_NASTY = _NASTY_NUMBERS | _NASTY_NAMES | st.sampled_from([True, None, [], {}, "NaN"])
_NUMBERS = st.one_of(
    st.integers(-100, 100),
    st.integers(),
    st.floats(-100, 100),
    st.floats(),  # incl. nan, +-inf, subnormals (json writes NaN / Infinity, which Python's json reads back)
)
_SCALARS = st.none() | st.booleans() | _NUMBERS | st.text(max_size=12)
JSON_VALUES = st.one_of(
    _NASTY,
    _SCALARS,
    st.lists(_NASTY_NUMBERS | _NUMBERS, min_size=3, max_size=5),  # bbox-like
    st.recursive(_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(_KEYS, c, max_size=4), max_leaves=8),
)

_JSON_TOKENS = [b"[" * 3000, b"9" * 5000, b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b"NaN", b"-Infinity", b'"\\ud800"',
                b"{", b"}", b"]", b",", b'"', b"\\", b'"images": 1,']
_XML_TOKENS = [b"<", b">", b"&", b"&lol9;", b"\x00", b"\xff\xfe", b"<!--", b"]]>", b"<object>", b"</annotation>",
               b"<![CDATA[", b"\xc3"]
_XML_TEXTS = st.one_of(
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e400", "9" * 400, "-5", "0", "", "   ", "1.5", "0x10", "1_000",
                     "dog", "dragon", "person", "1e18", "-1e18", "000005.jpg", "../000007.jpg", "/", "<&>",
                     "x" * 300]),
    st.integers().map(str),
    st.floats().map(repr),
    st.text(max_size=12),
)
_XML_TAGS = ["annotation", "filename", "size", "width", "height", "object", "name", "difficult", "bndbox",
             "xmin", "ymin", "xmax", "ymax", "x"]
_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY lol "lol">'
           + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 10))
           + "]>")
_PROLOGUES = [
    "", '<?xml version="1.0" encoding="utf-8"?>', _LAUGHS,
    '<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY lol9 SYSTEM "file:///etc/passwd">]>',
    '<?xml version="1.0"?><!DOCTYPE annotation SYSTEM "http://127.0.0.1:9/voc.dtd">',
    '<?xml version="1.0"?><!DOCTYPE annotation>', '<?xml version="1.0" encoding="bogus"?>',
    '<?xml version="1.0" encoding="utf-16"?>', '<?xml version="1.0" encoding="latin-1"?>', "\ufeff", "<!-- c -->",
]
_MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8", b"GIF89a", b"GIF87a", b"BM", b"II*\x00",
           b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n16 12\n255\n", b"P5\n65535 65535\n255\n", b"8BPS",
           b"\x00\x00\x01\x00", b"\x00\x00\x00\x0cjP  ", b"\x00\x00\x00\x1cftypavif", b"qoif", b"DDS ", b"\x00"]


def _json_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _json_paths(v, (*prefix, i))


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def mutate_json(data, doc):
    """A deep copy of `doc` with 0..4 structural mutations drawn from `data` (hypothesis st.data())."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(0, 4), label="json ops")):
        paths = list(_json_paths(doc))
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["field", "replace", "delete", "splice", "duplicate", "insert"]), label="op")
        if op == "splice":  # a copy of another node (type confusion: an image where an annotation goes, ...)
            value = copy.deepcopy(_get(doc, data.draw(st.sampled_from(paths), label="from")))
        else:
            # a copy: sampled_from hands out the same [] and {} to every example, and the ops below mutate in place
            value = copy.deepcopy(data.draw(JSON_VALUES, label="value"))
        if op == "field":  # a field of an image, annotation or category entry, set to a value typed for it
            kind = data.draw(st.sampled_from(["images", "annotations", "images", "annotations", "categories"]))
            listed = doc.get(kind) if isinstance(doc, dict) else None
            entries = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
            if entries:
                key = data.draw(st.sampled_from(_ENTRY_FIELDS[kind]), label="field")
                typed = {"file_name": _NASTY_NAMES, "name": _NASTY_NAMES,
                         "bbox": st.lists(_NASTY_NUMBERS | _NUMBERS, min_size=4, max_size=4)}.get(key, _NASTY_NUMBERS)
                entry = data.draw(st.sampled_from(entries), label="entry")
                entry[key] = copy.deepcopy(data.draw(typed | JSON_VALUES, label="to"))
            continue
        if not path:
            doc = value if op in ("replace", "splice") else doc
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if op in ("replace", "splice"):
            parent[key] = value
        elif op == "delete":
            del parent[key]
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op in ("duplicate", "insert"):
            target = _get(doc, path)
            if isinstance(target, dict):
                target[data.draw(_KEYS, label="key")] = value
            elif isinstance(target, list):
                target.insert(data.draw(st.integers(0, len(target)), label="at"), value)
            else:
                parent[key] = [target, value]
    return doc


def mutate_bytes(data, raw: bytes, tokens: list[bytes], max_ops: int = 3) -> bytes:
    """0..max_ops byte-level mutations: truncation, byte flips, inserted tokens or random bytes, deleted spans."""
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(0, max_ops), label="byte ops")):
        op = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete"]), label="byte op")
        at = data.draw(st.integers(0, len(buf)), label="at")
        if op == "truncate":
            del buf[at:]
        elif op == "flip" and at < len(buf):
            buf[at] ^= data.draw(st.integers(1, 255), label="xor")
        elif op == "insert":
            buf[at:at] = data.draw(st.sampled_from(tokens) | st.binary(min_size=1, max_size=8), label="bytes")
        elif op == "delete":
            del buf[at:at + data.draw(st.integers(1, 64), label="len")]
    return bytes(buf)


def mutate_image(data, raw: bytes) -> bytes:
    """1..4 image mutations: size fields, byte flips, overwritten windows, other headers, truncation, junk."""
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="image ops")):
        op = data.draw(st.sampled_from(["flip", "size", "overwrite", "header", "truncate", "insert", "delete",
                                        "empty", "random"]), label="image op")
        at = data.draw(st.integers(0, max(len(buf) - 1, 0)), label="at")
        if op == "flip" and buf:
            buf[at] ^= data.draw(st.integers(1, 255), label="xor")
        elif op == "size":
            dims = st.sampled_from([0, 1, 2, 17, 300, 1000, 65535, 2**31 - 1])
            _set_size(buf, data.draw(dims, label="h"), data.draw(dims, label="w"))
        elif op == "overwrite":
            value = data.draw(st.sampled_from([b"\x00\x00", b"\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00"]))
            buf[at:at + len(value)] = value
        elif op == "header":
            magic = data.draw(st.sampled_from(_MAGICS), label="magic")
            buf[:len(magic)] = magic
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        elif op == "delete":
            del buf[at:at + data.draw(st.integers(1, 64), label="len")]
        elif op == "empty":
            buf = bytearray()
        elif op == "random":
            buf = bytearray(data.draw(st.binary(max_size=64), label="random"))
    return bytes(buf)


def mutate_xml(data, text: str) -> str:
    """0..4 element-level mutations of a VOC annotation, then a drawn prologue (entity tricks, encodings)."""
    root = ET.fromstring(text)
    for _ in range(data.draw(st.integers(0, 4), label="xml ops")):
        parents = {c: p for p in root.iter() for c in p}
        el = data.draw(st.sampled_from(list(root.iter())), label="element")
        op = data.draw(st.sampled_from(["text", "remove", "duplicate", "rename", "add"]), label="xml op")
        parent = parents.get(el)
        if op == "text":
            el.text = data.draw(_XML_TEXTS, label="text")
        elif op == "remove" and parent is not None:
            parent.remove(el)
        elif op == "duplicate" and parent is not None:
            parent.insert(list(parent).index(el), copy.deepcopy(el))
        elif op == "rename":
            el.tag = data.draw(st.sampled_from(_XML_TAGS), label="tag")
        else:
            child = ET.SubElement(el, data.draw(st.sampled_from(_XML_TAGS), label="tag"))
            child.text = data.draw(_XML_TEXTS, label="text")
    out = ET.tostring(root, encoding="unicode")
    prologue = data.draw(st.just("") | st.sampled_from(_PROLOGUES), label="prologue")
    if "ENTITY lol9" in prologue and data.draw(st.booleans(), label="use entity"):
        out = out.replace("<name>", "<name>&lol9;", 1)
    return prologue + out


# --------------------------------------------------------------------------------------------- properties


@FUZZ
@given(data=st.data())
def test_coco_fuzz(data, coco_dir):
    root, ann = coco_dir
    doc = mutate_json(data, COCO_DOC)
    text = json.dumps(doc)  # ensure_ascii: lone surrogates become \\ud800 escapes
    raw = mutate_bytes(data, text.encode(), _JSON_TOKENS, max_ops=data.draw(st.sampled_from([0, 0, 0, 1, 3])))
    ann.write_bytes(raw)
    with _time_limit(f"CocoDetection on {raw[:200]!r}"):
        strict = _coco_outcome(root, ann, False)
        lenient = _coco_outcome(root, ann, True)
    event(f"strict: {getattr(strict, 'reason', type(strict).__name__)}")
    if doc == COCO_DOC and raw == text.encode():
        assert isinstance(strict, CocoDetection) and len(strict) == 3 and not strict.skipped, strict
    if isinstance(strict, CocoDetection):  # nothing bad: skip_bad=True sees the same set and skips nothing
        assert isinstance(lenient, CocoDetection) and not lenient.build_skipped and len(lenient) == len(strict)
    elif not isinstance(strict, DataError) or strict.reason in COCO_STRUCTURAL:  # stops both the same way
        assert type(lenient) is type(strict) and str(lenient) == str(strict), (strict, lenient)
    else:  # the first bad entry stops the strict set; skip_bad=True counts it
        assert isinstance(lenient, CocoDetection), f"skip_bad=True raised {lenient!r}; strict raised {strict!r}"
        assert lenient.build_skipped[strict.reason] >= 1, (strict, lenient.build_skipped)


@FUZZ
@given(data=st.data())
def test_voc_fuzz(data, voc_dir):
    root, xmls = voc_dir
    mutated = False
    for xml, base in zip(xmls, VOC_XML):
        raw = base.encode()
        if data.draw(st.booleans(), label="mutate this file"):
            mutated = True
            raw = mutate_bytes(data, mutate_xml(data, base).encode(), _XML_TOKENS,
                               max_ops=data.draw(st.sampled_from([0, 0, 0, 1, 3])))
        xml.write_bytes(raw)
    with _time_limit(f"VOCDetection on {[x.read_bytes()[:200] for x in xmls]}"):
        strict = _voc_outcome(root, xmls, False)
        lenient = _voc_outcome(root, xmls, True)
    event(f"strict: {getattr(strict, 'reason', type(strict).__name__)}")
    assert isinstance(lenient, VOCDetection), f"skip_bad=True could not build the set: {lenient!r}"
    if not mutated:
        assert isinstance(strict, VOCDetection) and len(strict) == 2 and not strict.skipped, strict
    if isinstance(strict, VOCDetection):
        assert not lenient.build_skipped and len(lenient) == len(strict), lenient.build_skipped
    else:
        assert lenient.build_skipped[strict.reason] >= 1, (strict, lenient.build_skipped)


@FUZZ
@given(data=st.data())
def test_read_image_fuzz(data, work, isolated):
    name, h, w, base = BASE_IMAGES[data.draw(st.integers(0, len(BASE_IMAGES) - 1), label="image")]
    raw = mutate_image(data, base)
    path = work / "read_image" / f"img{data.draw(st.sampled_from(['.png', '.jpg', '.bin']), label='ext')}"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(raw)
    shape = isolated.call(_read_image_shape, path, label=f"on a {len(raw)}-byte {_kind(raw)}: {raw[:48]!r}")
    if raw == base:
        assert shape == (3, h, w)


@FUZZ_HALF
@given(data=st.data())
def test_coco_bad_images_fuzz(data, work, isolated):
    """Bad image files (valid annotations) through CocoDetection, strict and skip_bad=True."""
    root, ann = work / "coco_images" / "images", work / "coco_images" / "annotations.json"
    images = [(fn, h, w, mutate_image(data, raw) if data.draw(st.booleans(), label=f"mutate {fn}") else raw)
              for fn, h, w, raw in BASE_IMAGES]
    paths = _write_images(root, images)
    ann.write_text(json.dumps(COCO_DOC))
    label = "on " + ", ".join(f"a {len(raw)}-byte {_kind(raw)}" for *_, raw in images)
    isolated.call(_coco_with_images, root, ann, paths, [(h, w) for _, h, w, _ in images], label=label)


# --------------------------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_loaders_bugs_found_by_fuzzing(name, tmp_path, isolated):
    """Each input that once broke a loader, through the same contract check (strict and skip_bad=True)."""
    bug = REGRESSIONS[name]
    if bug.where == "coco":
        root = tmp_path / "images"
        _write_images(root)
        ann = tmp_path / "annotations.json"
        ann.write_text(bug.repro)
        for skip_bad in (False, True):
            _coco_outcome(root, ann, skip_bad)
    elif bug.where == "voc":
        root = tmp_path / "VOC2007"
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n")
        _write_images(root / "JPEGImages", [("000005.jpg", 30, 40, _encode(_rgb(30, 40, 4), "JPEG"))])
        xml = root / "Annotations" / "000005.xml"
        xml.parent.mkdir()
        xml.write_text(bug.repro)
        for skip_bad in (False, True):
            _voc_outcome(root, [xml], skip_bad)
    else:
        path = tmp_path / "img.bin"
        path.write_bytes(bug.repro)
        assert isolated.call(_read_image_shape, path, label=f"on a {_kind(bug.repro)}") is None  # refused, named
