"""Image folders: one subfolder per class (or images directly in the folder: one class), read and
preprocessed as the official train.py reads them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import BadImageError, DitDataset, center_crop_arr, to_unit_range

# torchvision's IMG_EXTENSIONS: the files ImageFolder (and so the official train.py) reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
OFFICIAL_IMAGE_SIZE = 256  # the official train.py's --image-size default
# What PIL raises for unreadable, truncated or absurdly large files.
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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
            image = to_mode(Image.open(f), self.mode)  # convert() decodes: a truncated file fails here
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


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` as L or RGB. Gray of 16 bits (PNG's open as I;16, or I) is scaled to 8 bits first:
    PIL's convert() would clip every value above 255 to white."""
    if image.mode.startswith("I"):
        wide = np.asarray(image, dtype=np.float64)  # 0..65535
        image = Image.fromarray(np.clip(np.round(wide / 257), 0, 255).astype(np.uint8), "L")
    return image.convert(mode)


def walk_images(root: Path) -> list[str]:
    """Every image file under `root` (sorted as os.walk's folders, then names), following symlinks
    but into each real folder once: a link back up the tree would repeat its images many times."""
    seen, folders = set(), []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []  # been there by another path
            continue
        seen.add(real)
        folders.append((folder, files))
    return [os.path.join(d, f) for d, files in sorted(folders) for f in sorted(files) if is_image(f)]


def scan_image_folder(root: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """(class names, [(path, label)]) of a class-folder tree or of a flat folder of images."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.path for e in entries if e.is_file() and is_image(e.name)]
    if loose and subdirs:
        raise ValueError(f"{root} holds both images and subfolders ({subdirs[0]}, ...); put every image in a class subfolder, or move the subfolders out for an unconditional dataset.")
    if loose:
        return (root.name,), [(path, 0) for path in loose]
    if not subdirs:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put images in it, or one subfolder of images per class.")
    samples = []
    for label, name in enumerate(subdirs):
        found = walk_images(root / name)
        if not found:
            raise ValueError(f"class folder {root / name} holds no images; add images to it or remove it.")
        samples += [(path, label) for path in found]
    return tuple(subdirs), samples
