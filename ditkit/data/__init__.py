"""Datasets for DiT training, and `ditkit extract`, which turns one into a latent store.

Every dataset yields (x, y): x a float32 (C, H, W) tensor, y an int class label (the DataLoader
collates it to int64). `build_dataset` is the one entry point; it returns

- `ImageFolderDataset` (images): a folder with one subfolder per class (or images directly in it:
  one class), preprocessed as the official train.py (ADM center crop, flip, [-1, 1]);
- `NamedDataset` (named): fashion-mnist, mnist or digits, held whole in memory as uint8;
- `LatentDataset` (latents): a store written by `ditkit extract` (VAE mean and log-variance of
  every image and of its mirror image), sampled at load time as the official train.py samples each step.

Random choices (the flip; the latent sample) are a pure function of (seed, epoch, index), not of
a worker's RNG: call `dataset.set_epoch(epoch)` next to `sampler.set_epoch(epoch)` and a resumed
epoch sees exactly the data it would have seen, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from .base import BadImageError, DitDataset, center_crop_arr, item_seed, to_unit_range
from .images import IMAGE_EXTENSIONS, OFFICIAL_IMAGE_SIZE, ImageFolderDataset, is_image, scan_image_folder, to_mode, walk_images
from .build import build_dataset
from .extract import run_extract
from .latents import LatentDataset, is_latent_store, read_store_meta
from .named import DIGIT_CLASSES, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, NAMED, NamedDataset, NamedSource, read_idx

__all__ = ["BadImageError", "DitDataset", "center_crop_arr", "item_seed", "to_unit_range", "IMAGE_EXTENSIONS", "OFFICIAL_IMAGE_SIZE",
           "ImageFolderDataset", "is_image", "scan_image_folder", "to_mode", "walk_images", "LatentDataset", "is_latent_store", "read_store_meta", "run_extract",
           "DIGIT_CLASSES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "NAMED", "NamedDataset", "NamedSource", "read_idx", "build_dataset"]  # fmt: skip
