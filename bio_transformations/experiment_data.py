"""Data loading for :mod:`bio_transformations.experiment`.

Two sources, both offline:

* ``load_digits_split``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images,
  shipped inside scikit-learn, so nothing is downloaded), with a fixed stratified split.
* ``load_idx_dir``: MNIST (or any dataset in the same format, e.g. Fashion-MNIST) from a local
  folder holding the four standard IDX files, optionally gzip-compressed.

Both return a :class:`Dataset` of float32 images scaled to ``[0, 1]`` with shape
``(N, 1, H, W)`` and int64 labels, so the models can flatten or convolve as they like.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataError",
    "Dataset",
    "IDX_FILES",
    "load_digits_split",
    "load_idx_dir",
    "read_idx",
]

# The four files of the standard MNIST distribution, keyed by role. Some mirrors spell the
# suffix with a dot ("train-images.idx3-ubyte"); both spellings and ".gz" are accepted.
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third magic byte) -> numpy dtype; multi-byte types are big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data folder or file is missing, empty or malformed (reported as a usage error)."""


@dataclass
class Dataset:
    """A train/test split held in memory as tensors.

    Attributes:
        name: Human-readable source name (goes into the results files).
        x_train: Float32 images in ``[0, 1]``, shape ``(N, 1, H, W)``.
        y_train: Int64 class labels, shape ``(N,)``.
        x_test: Like ``x_train`` for the held-out split.
        y_test: Like ``y_train`` for the held-out split.
        num_classes: Number of classes (labels are ``0 .. num_classes - 1``).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def describe(self) -> dict[str, object]:
        """A JSON-friendly summary (sizes, shape, classes)."""
        return {
            "name": self.name,
            "train_size": int(self.x_train.shape[0]),
            "test_size": int(self.x_test.shape[0]),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
        }


def load_digits_split(test_size: float = 0.3, random_state: int = 0) -> Dataset:
    """Load scikit-learn's 8x8 digits with a fixed stratified train/test split.

    Args:
        test_size: Fraction of the 1,797 images held out for testing.
        random_state: Seed of the split; fixed so every run and variant sees the same split.

    Returns:
        A :class:`Dataset` with images of shape ``(1, 8, 8)`` scaled from ``0..16`` to ``[0, 1]``.
    """
    # Imported lazily: scikit-learn is an optional ("experiment") dependency.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are integers 0..16 in this dataset.
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=random_state
    )
    return Dataset(
        name="sklearn-digits-8x8",
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te)),
        num_classes=10,
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    The format: two zero bytes, a type code, the number of dimensions, one big-endian uint32
    per dimension, then the data in C order.

    Raises:
        DataError: If the file is truncated, has a bad magic number or a wrong data size.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:  # gzip raises these on corrupt archives
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} has a truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape))
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes) but the file "
            f"holds {len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    """Return the first existing spelling of an IDX file in ``folder`` or ``None``."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def check_idx_dir(data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Check that ``data_dir`` holds the four IDX files and return their paths by role.

    Only looks at file names (cheap), so the command line can reject a bad folder before any
    training starts.

    Raises:
        DataError: If the folder is missing, empty or lacks one of the files.
    """
    folder = Path(data_dir)
    expected = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
    if not folder.exists():
        raise DataError(f"data directory {folder} does not exist; expected the files {expected}")
    if not folder.is_dir():
        raise DataError(
            f"data directory {folder} is not a directory; expected the files {expected}"
        )
    if not any(folder.iterdir()):
        raise DataError(f"data directory {folder} is empty; expected the files {expected}")
    found: dict[str, Path] = {}
    missing = []
    for role, stem in IDX_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            missing.append(stem + "[.gz]")
        else:
            found[role] = path
    if missing:
        raise DataError(
            f"data directory {folder} lacks {', '.join(missing)}; expected the files {expected}"
        )
    return found


def load_idx_dir(data_dir: str | os.PathLike[str]) -> Dataset:
    """Load an MNIST-style dataset from a folder with the four standard IDX files.

    Uses the dataset's own train/test split. Images (``uint8``, shape ``(N, H, W)``) are scaled
    by 1/255; labels must be integers ``>= 0``.

    Raises:
        DataError: If the folder or a file is missing, empty or malformed, or the image and
            label counts disagree.
    """
    paths = check_idx_dir(data_dir)
    arrays = {role: read_idx(path) for role, path in paths.items()}
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(
                f"{paths[f'{split}_images'].name} must be 3-D (N, H, W) and "
                f"{paths[f'{split}_labels'].name} 1-D; got {images.shape} and {labels.shape}"
            )
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise DataError(f"{split} split: {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.min() < 0:
            raise DataError(f"{paths[f'{split}_labels'].name} holds negative labels")
        # uint8 pixels -> [0, 1]; other types are min-max scaled so the claim still holds.
        x = images.astype(np.float32)
        if images.dtype == np.uint8:
            x /= 255.0
        else:
            lo, hi = float(x.min()), float(x.max())
            x = (x - lo) / (hi - lo if hi > lo else 1.0)
        splits[split] = (
            torch.from_numpy(np.ascontiguousarray(x[:, None, :, :])),
            torch.from_numpy(labels.astype(np.int64)),
        )
    if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
        raise DataError("train and test images have different shapes")
    num_classes = int(max(splits["train"][1].max(), splits["test"][1].max())) + 1
    return Dataset(
        name=f"idx:{Path(data_dir).name or data_dir}",
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        num_classes=num_classes,
    )
