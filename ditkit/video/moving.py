"""moving-fashion-mnist: clips made offline from Fashion-MNIST, the same clip for the same index.

Clip i of a split shows that split's item i, resized to 20x20 (bilinear, antialiased), on a black
32x32 canvas: its top-left corner starts uniformly at random in [0, 12]^2 and moves with a constant
velocity whose x and y components are each uniform in [1, 2] pixels per frame with a random sign,
bouncing off the canvas edges (the component that would leave is reflected). Positions are exact
(real-valued); each frame draws the item at the nearest whole pixel. The label is the item's class.
The motion is drawn from a generator seeded by (seed, split, index) alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MIN_FRAMES, SPLITS
from ..data import FASHION_MNIST_CLASSES, NAMED, DitDataset, to_unit_range

CANVAS, ITEM, FRAMES = 32, 20, 16  # canvas and item sides in pixels; frames per clip
SPEED = (1.0, 2.0)  # pixels per frame, each velocity component, before its sign
TRAVEL = CANVAS - ITEM  # the top-left corner stays in [0, TRAVEL]


def trajectory(rng: np.random.Generator, frames: int = FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """(positions (T, 2), velocities (T, 2)) of the item's top-left corner as (x, y) in each frame;
    a velocity component changes sign where the item bounces."""
    pos = rng.uniform(0, TRAVEL, size=2)
    vel = rng.uniform(*SPEED, size=2) * rng.choice([-1.0, 1.0], size=2)
    positions, velocities = np.empty((frames, 2)), np.empty((frames, 2))
    for t in range(frames):
        positions[t], velocities[t] = pos, vel
        pos = pos + vel
        low, high = pos < 0, pos > TRAVEL  # a component that would leave is reflected
        pos = np.where(low, -pos, np.where(high, 2 * TRAVEL - pos, pos))
        vel = np.where(low | high, -vel, vel)
    return positions, velocities


def render(item: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(T, CANVAS, CANVAS) uint8: the (ITEM, ITEM) item at each rounded position (x, y)."""
    clip = np.zeros((len(positions), CANVAS, CANVAS), dtype=np.uint8)
    for t, (x, y) in enumerate(np.rint(positions).astype(int)):
        clip[t, y : y + ITEM, x : x + ITEM] = item
    return clip


def resized_items(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, ITEM, ITEM) uint8, bilinear with antialiasing."""
    x = torch.from_numpy(images).float()[:, None]  # (N, 1, 28, 28)
    x = F.interpolate(x, size=(ITEM, ITEM), mode="bilinear", antialias=True, align_corners=False)
    return x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def moving_clips(split: str = "train", indices=None, frames: int = FRAMES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(clips (N, T, 32, 32, 1) uint8, labels (N,)) of the given indices (default: all): the
    reference sets of `ditkit eval` and the classifier's training data."""
    images, labels = NAMED["fashion-mnist"].load(split)
    indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
    items = resized_items(images[indices])
    clips = np.stack([render(item, trajectory(clip_rng(seed, split, int(i)), frames)[0]) for item, i in zip(items, indices)])
    return clips[..., None], labels[indices]


class MovingFashionMNIST(DitDataset):
    """moving-fashion-mnist as a training set: (C, T, 32, 32) clips in [-1, 1] and their classes.
    `flip` mirrors a clip (its motion too), chosen per (seed, epoch, index) as for images."""

    def __init__(self, frames: int | None = None, channels: int = 1, split: str = "train", flip: bool = True, seed: int = 0):
        super().__init__(flip, seed)
        self.frames = frames or FRAMES
        if not MIN_FRAMES <= self.frames <= FRAMES:
            raise ValueError(f"moving-fashion-mnist clips have {MIN_FRAMES} to {FRAMES} frames, not {self.frames}; pass --frames in that range.")
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}; pick one of those.")
        self.images, self.labels = NAMED["fashion-mnist"].load(split)  # (N, 28, 28) uint8, resized item by item
        self.split, self.motion_seed = split, 0  # the motion is the dataset's, not the run's
        self.channels, self.image_size = channels, CANVAS
        self.class_names = FASHION_MNIST_CLASSES
        self.num_classes = len(self.class_names)
        self.source = f"moving-fashion-mnist ({split}, {self.frames} frames)"

    def _item(self, index: int, rand: int) -> tuple[torch.Tensor, int]:
        positions, _ = trajectory(clip_rng(self.motion_seed, self.split, index), self.frames)
        item = resized_items(self.images[index : index + 1])[0]  # (ITEM, ITEM)
        x = to_unit_range(torch.from_numpy(render(item, positions)))[None]  # (1, T, H, W)
        if self._flipped(rand):
            x = x.flip(-1)
        return x.expand(self.channels, -1, -1, -1).contiguous(), int(self.labels[index])

    def __repr__(self) -> str:
        return f"MovingFashionMNIST({self.source}: {len(self)} clips, {self.num_classes} classes, {self.channels}x{self.frames}x{CANVAS}x{CANVAS})"
