"""What every ditkit dataset is: items (x, y) whose random choices (the flip, the latent sample) are a
pure function of (seed, epoch, index); the official preprocessing of an image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


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


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit number for one item in one epoch. Its lowest bit is the item's flip;
    the rest seeds the torch.Generator of its latent noise."""
    return splitmix64(splitmix64(splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))


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
