"""A plain image folder for classification: one subfolder per class (``root/<class>/**/<image>``).

Classes are the subfolder names in sorted order (label = position), unless ``classes`` is given. Files
whose extension is not an image extension, and hidden files and folders, are ignored. Images are read
lazily (EXIF orientation applied); a corrupt or missing one raises an error naming the file, or with
``skip_bad=True`` is logged, counted in ``dataset.skipped`` and replaced by the next valid index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .common import IMAGE_EXTENSIONS, DataError, SkipLog, SkippingDataset, logger, read_image

__all__ = ["ImageFolder"]


def _walk_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith(".") and fn.lower().endswith(extensions):
                out.append(Path(dirpath) / fn)
    return out


class ImageFolder(SkippingDataset):
    """``root/<class>/<image>`` as (image, label): image a float 0..1 ``tv_tensors.Image`` 3 x H x W, label an int.

    Args:
        root: the folder holding one subfolder per class.
        transform: applied to the image alone (e.g. :func:`vertebra.data.classification_transforms`).
        classes: class names in label order (default: sorted subfolder names); each must be a subfolder.
        extensions: file name endings counted as images (case-insensitive).
        skip_bad: skip (log and count) unreadable images instead of raising.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_bad: bool = False,
    ):
        self.root = Path(root)
        self.transform = transform
        self.skip_bad = skip_bad
        self.log = SkipLog(str(self.root))
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            classes = found
        else:
            missing = [c for c in classes if c not in found]
            if missing:
                raise DataError(f"{self.root}: class folders not found: {missing} (found: {found})", "missing class")
        if not classes:
            raise DataError(f"{self.root}: no class subfolders; expected root/<class>/<image files>", "no classes")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for c in self.classes:
            files = _walk_images(self.root / c, exts)
            if not files:
                empty.append(c)
            self.samples.extend((f, self.class_to_idx[c]) for f in files)
        if not self.samples:
            raise DataError(f"{self.root}: no image files (extensions {', '.join(exts)}) under the class folders",
                            "no images")
        if empty:
            logger.warning("%s: class folders with no images: %s", self.root, ", ".join(empty))
        self.targets = [lab for _, lab in self.samples]
        self._init_skips()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        n = len(self.samples)
        return self.log.summary(n, "images") + f" ({n} images, {len(self.classes)} classes)"

    def __len__(self) -> int:
        return len(self.samples)

    def load_item(self, index: int):
        path, label = self.samples[index]
        img = read_image(path, exif=True)
        if self.transform is not None:
            img = self.transform(img)
        return img, label
