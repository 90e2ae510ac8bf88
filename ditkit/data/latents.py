"""Latent stores: `ditkit extract` (extract.py) encodes every image and its mirror image with the VAE
(posterior mean and log-variance), and `LatentDataset` samples a latent of each at load time, as the
official train.py does every step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .base import DitDataset

STORE_FORMAT = "ditkit-latents"
STORE_META = "meta.json"  # written last: a store without it is unfinished
STORE_PARTIAL = "meta.partial.json"  # the meta.json-to-be of an extraction under way (or interrupted)
STORE_DONE = "done.npy"  # (N,) uint8: rows already encoded, for resuming


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
