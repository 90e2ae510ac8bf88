"""Samples as uint8 arrays and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounded as the official sample_ddp.py; clips
    (N, C, T, H, W) -> (N, T, H, W, C)."""
    channels_last = (0, *range(2, x.ndim), 1)
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(*channels_last).to("cpu", dtype=torch.uint8).numpy()


def make_grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """(N, ..., H, W, C) uint8 -> (..., rows, columns, C): the images tiled `ncol` to a row on black,
    each frame of clips (N, T, H, W, C) its own grid."""
    n, (h, w, c) = images.shape[0], images.shape[-3:]
    nrow = math.ceil(n / ncol)
    grid = np.zeros((*images.shape[1:-3], nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[..., pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w, :] = img
    return grid


def save_grid(images: np.ndarray, path: str | Path, ncol: int, pad: int = 2) -> None:
    """(N, H, W, C) uint8 -> one PNG grid with `ncol` columns."""
    grid = make_grid(images, ncol, pad)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
