"""CIFAR-10 / CIFAR-100 from the python batches of https://www.cs.toronto.edu/~kriz/cifar.html.

``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``.
``cifar-100-python/``: ``train``, ``test``, ``meta`` (fine and coarse labels).

The files are pickles; they are read with an unpickler that only admits the few numpy names an array
needs, so a tampered file cannot run code. Images come out as float 0..1 ``tv_tensors.Image`` 3 x 32 x 32.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .common import DataError

__all__ = ["CIFAR", "CIFAR10", "CIFAR100", "read_cifar_batch"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        # numpy 2 renamed numpy.core to numpy._core (the old name warns); numpy 1 has only numpy.core
        if hasattr(np, "_core") and module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core."):]
        elif not hasattr(np, "_core") and module.startswith("numpy._core."):
            module = "numpy.core." + module[len("numpy._core."):]
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike) -> dict[str, Any]:
    """Load one CIFAR python batch as a dict with str keys; DataError naming the file when it is not one."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            obj = _SafeUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: CIFAR batch file not found") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ...
        raise DataError(f"{p}: not a readable CIFAR python batch ({type(e).__name__}: {e})",
                        "malformed batch") from None
    if not isinstance(obj, dict):
        raise DataError(f"{p}: a CIFAR batch is a dict, got {type(obj).__name__}", "malformed batch")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    if key not in meta:
        raise DataError(f"{path}: missing field '{key}'", "malformed batch")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[key]]


def _find_dir(root: Path, variant: str | None) -> tuple[Path, str]:
    cands = [root, root / "cifar-10-batches-py", root / "cifar-100-python"]
    for d in cands:
        if variant in (None, "cifar10") and (d / "data_batch_1").is_file():
            return d, "cifar10"
        if variant in (None, "cifar100") and (d / "train").is_file() and (d / "meta").is_file():
            return d, "cifar100"
    want = {"cifar10": "data_batch_1..5 + test_batch", "cifar100": "train, test, meta"}
    raise FileNotFoundError(
        f"{root}: no CIFAR python batches found (looked for {want.get(variant, 'either layout')} in {root} and "
        "its cifar-10-batches-py/ or cifar-100-python/ subfolder)"
    )


class CIFAR(Dataset):
    """CIFAR-10 or CIFAR-100 from the python batches, as (image, label).

    Args:
        root: the batch folder (``cifar-10-batches-py`` / ``cifar-100-python``) or the folder holding it.
        train: the training batches (else the test batch).
        transform: applied to the image alone.
        variant: ``"cifar10"``, ``"cifar100"`` or None to detect from the files.
        coarse: CIFAR-100 only: the 20 coarse labels instead of the 100 fine ones.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        transform: Callable | None = None,
        *,
        variant: str | None = None,
        coarse: bool = False,
    ):
        if variant not in (None, "cifar10", "cifar100"):
            raise ValueError(f"variant must be 'cifar10', 'cifar100' or None, got {variant!r}")
        self.transform = transform
        self.train = train
        self.root, self.variant = _find_dir(Path(root), variant)
        if self.variant == "cifar10":
            files = [self.root / f"data_batch_{i}" for i in range(1, 6)] if train else [self.root / "test_batch"]
            meta_file, name_key, label_key = self.root / "batches.meta", "label_names", "labels"
        else:
            files = [self.root / ("train" if train else "test")]
            meta_file = self.root / "meta"
            name_key, label_key = ("coarse_label_names", "coarse_labels") if coarse else ("fine_label_names",
                                                                                           "fine_labels")
        self.classes = _names(read_cifar_batch(meta_file), name_key, meta_file)
        datas, labels = [], []
        for f in files:
            b = read_cifar_batch(f)
            if "data" not in b:
                raise DataError(f"{f}: missing field 'data'", "malformed batch")
            if label_key not in b:
                raise DataError(f"{f}: missing field '{label_key}'", "malformed batch")
            d = np.asarray(b["data"])
            if d.dtype != np.uint8 or d.ndim != 2 or d.shape[1] != 3 * 32 * 32:
                raise DataError(f"{f}: field 'data' must be uint8 N x 3072, got {d.dtype} {d.shape}", "malformed batch")
            lab = np.asarray(b[label_key], dtype=np.int64).reshape(-1)
            if len(lab) != len(d):
                raise DataError(f"{f}: {len(lab)} '{label_key}' for {len(d)} images", "malformed batch")
            if len(lab) and (lab.min() < 0 or lab.max() >= len(self.classes)):
                raise DataError(f"{f}: '{label_key}' out of range 0..{len(self.classes) - 1}", "malformed batch")
            datas.append(d)
            labels.append(lab)
        self.data = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32))  # uint8 N x 3 x 32 x 32
        self.targets = torch.from_numpy(np.concatenate(labels))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img = tv_tensors.Image(self.data[index].to(torch.float32).div_(255.0))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


class CIFAR10(CIFAR):
    """CIFAR-10 (10 classes, 50000 train / 10000 test)."""

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None):
        super().__init__(root, train, transform, variant="cifar10")


class CIFAR100(CIFAR):
    """CIFAR-100 (100 fine or 20 coarse classes, 50000 train / 10000 test)."""

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None, *,
                 coarse: bool = False):
        super().__init__(root, train, transform, variant="cifar100", coarse=coarse)
