"""ADM-format image arrays (.npz: arr_0 uint8 N×H×W×C, optional labels; clips N×T×H×W×C), read in
batches; datasets as reference sets; the cache of dataset files and reference statistics."""

from __future__ import annotations

import contextlib
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..data import NAMED
from ..utils.io import cache_dir, save_npz
from ..video.moving import moving_clips

DATASET_SPEC = re.compile(r"^(fashion-mnist|moving-fashion-mnist)(?:-(train|test))?(?::(\d+))?$")


@contextlib.contextmanager
def _open_member(path: Path, name: str):
    """(file, shape, fortran_order, dtype) of a .npy member of an .npz, positioned at the data."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            yield None, None, None, None
            return
        shape, fortran, dtype = read_header(f)
        yield f, shape, fortran, dtype


@dataclass(frozen=True)
class ImageArray:
    """The images (and labels) of an ADM-format .npz; `batches` streams arr_0 from the file, so
    50 000 256-px samples never sit in memory at once."""

    path: Path
    shape: tuple[int, ...]  # (N, H, W, C), or (N, T, H, W, C) for clips
    labels: np.ndarray | None
    name: str = ""

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def clips(self) -> bool:
        return len(self.shape) == 5

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        per_image = int(np.prod(self.shape[1:]))
        with _open_member(self.path, "arr_0") as (f, shape, fortran, _):
            if f is None or fortran:  # unusual layouts: load whole
                arr = np.load(self.path)["arr_0"]
                yield from (arr[i : i + batch_size] for i in range(0, len(arr), batch_size))
                return
            for i in range(0, self.shape[0], batch_size):
                n = min(batch_size, self.shape[0] - i)
                data = f.read(n * per_image)
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.shape[1:])


def read_images(path: str | Path, what: str = "samples") -> ImageArray:
    """Open and check an .npz of images: arr_0 uint8 N×H×W×C (C = 1 or 3), optional labels
    (`labels`, or ADM's `arr_1`), one per image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist; pass an .npz written by ditkit sample-npz (or np.savez).")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{what} file {path} is not an .npz archive; write the images with np.savez(path, arr_0=images).")
    with zipfile.ZipFile(path) as zf:
        names = [n.removesuffix(".npy") for n in zf.namelist()]
    if "arr_0" not in names:
        raise ValueError(f"{what} file {path} has no arr_0 array (it holds {', '.join(names) or 'nothing'}); store the images as arr_0, N×H×W×C uint8.")
    with _open_member(path, "arr_0") as (_, shape, _, dtype):
        if shape is None:
            arr = np.load(path)["arr_0"]
            shape, dtype = arr.shape, arr.dtype
    if dtype != np.uint8:
        if dtype.kind == "f" and np.isnan(np.load(path)["arr_0"]).any():
            raise ValueError(f"arr_0 in {path} contains NaN values; the sampler diverged, so re-sample (e.g. with --precision fp32) before evaluating.")
        raise ValueError(f"arr_0 in {path} has dtype {dtype}, not uint8; store images as uint8 in 0..255 (ditkit.generate.to_uint8 converts [-1, 1] tensors).")
    if len(shape) not in (4, 5) or shape[-1] not in (1, 3):
        hint = ""
        if len(shape) in (4, 5) and shape[1] in (1, 3):
            hint = f" It looks channels-first: transpose it with np.transpose(x, {(0, *range(2, len(shape)), 1)})."
        elif len(shape) == 3:
            hint = " Add a channel axis with x[..., None]."
        raise ValueError(f"arr_0 in {path} has shape {tuple(shape)}; it must be N×H×W×C images or N×T×H×W×C clips with C = 1 or 3 (channels last).{hint}")
    if shape[0] == 0:
        raise ValueError(f"arr_0 in {path} holds no images; sample some first.")
    labels, key = None, "labels"
    with np.load(path) as data:
        if "labels" in names:
            labels = data["labels"]
        elif "arr_1" in names and data["arr_1"].ndim == 1 and data["arr_1"].dtype.kind in "iu":
            labels, key = data["arr_1"], "arr_1"  # guided-diffusion's sample.py stores labels there
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"{key} in {path} must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}; store one class id per image.")
        if len(labels) != shape[0]:
            raise ValueError(f"{key} in {path} has {len(labels)} entries for {shape[0]} images; store exactly one label per image.")
        if labels.size and labels.min() < 0:
            raise ValueError(f"{key} in {path} has a negative class id ({labels.min()}); class ids start at 0.")
        labels = labels.astype(np.int64)
    return ImageArray(path=path, shape=tuple(int(s) for s in shape), labels=labels, name=path.name)


@dataclass(frozen=True)
class FrameView:
    """The frames of a clip array, each an image, for per-frame metrics: what an ImageArray of
    (N T, H, W, C) would be, read from the clips file."""

    clips: ImageArray

    @property
    def path(self) -> Path:
        return self.clips.path

    @property
    def shape(self) -> tuple[int, ...]:
        n, t, *rest = self.clips.shape
        return (n * t, *rest)

    labels = None

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for clips in self.clips.batches(max(1, batch_size // self.clips.shape[1])):
            yield clips.reshape(-1, *clips.shape[2:])


def to_float(images: np.ndarray, device: torch.device, channels: int | None = None) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [0, 1]; gray broadcast to `channels` if given."""
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device).permute(0, 3, 1, 2).float() / 255.0
    if channels is not None and x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)
    return x


# Datasets as reference sets: Fashion-MNIST from the Debian package, 28 px padded to 32 px.


def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 1) uint8 with a black border, labels (N,) int64) of a Fashion-MNIST
    split, from ditkit.data's reader of the Debian package's files."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use train or test.")
    src = NAMED["fashion-mnist"]
    images, labels = src.load(split)  # (N, 28, 28)
    p = (src.frame - images.shape[-1]) // 2
    return np.pad(images, ((0, 0), (p, p), (p, p)))[..., None], labels


def dataset_npz(name: str = "fashion-mnist", split: str = "test", n: int | None = None, seed: int = 0,
                out: str | Path | None = None, cache: str | Path | None = None) -> Path:  # fmt: skip
    """Write (once) a dataset split as an ADM-format .npz (arr_0, labels): fashion-mnist's images or
    moving-fashion-mnist's clips; `n` takes a seeded random subset. Without `out` the file goes to
    the ditkit cache and is reused."""
    if name not in ("fashion-mnist", "moving-fashion-mnist"):
        raise ValueError(f"unknown dataset {name!r}; ditkit knows fashion-mnist and moving-fashion-mnist (or pass an .npz file).")
    out = Path(out) if out is not None else cache_dir(cache) / "datasets" / f"{name}-{split}{f'-{n}-seed{seed}' if n else ''}.npz"
    if out.exists():
        return out
    size = len(NAMED["fashion-mnist"].load(split)[1])
    if n is not None and not 0 < n <= size:
        raise ValueError(f"{name} {split} has {size} items; ask for 1 to {size}, not {n}.")
    keep = np.random.default_rng(seed).choice(size, size=n, replace=False) if n is not None else None
    if name == "moving-fashion-mnist":  # clip i is the same clip whichever subset holds it
        images, labels = moving_clips(split, keep)
    else:
        images, labels = fashion_mnist(split)
        if keep is not None:
            images, labels = images[keep], labels[keep]
    return save_npz(out, arr_0=images, labels=labels)


def resolve_images(spec: str, what: str, cache: str | Path | None = None) -> Path:
    """An .npz path, or a dataset name: fashion-mnist (the test split), fashion-mnist-train,
    fashion-mnist-test, the same of moving-fashion-mnist (clips), each with an optional :N for a
    seeded random subset of N images."""
    if Path(spec).exists():
        return Path(spec)
    m = DATASET_SPEC.match(spec)
    if m is None and (spec.endswith(".npz") or os.sep in spec):
        raise FileNotFoundError(f"{what} file {spec} does not exist; pass an .npz written by ditkit sample-npz (or np.savez).")
    if m is None:
        raise FileNotFoundError(f"{what} {spec} is neither an existing .npz file nor a dataset name; pass a path, or fashion-mnist / fashion-mnist-train[:N] "
                                "(moving-fashion-mnist[-train][:N] for clips).")
    name, split, n = m.group(1), m.group(2) or "test", int(m.group(3)) if m.group(3) else None
    return dataset_npz(name, split, n, cache=cache)


def read_sample_prompts(samples: ImageArray) -> np.ndarray | None:
    """The `prompts` array a text-to-image (or text-to-video) .npz carries (one string per image or clip), or None."""
    with np.load(samples.path) as data:
        if "prompts" not in data.files:
            return None
        prompts = data["prompts"]
    if prompts.shape != (len(samples),) or prompts.dtype.kind != "U":
        raise ValueError(f"prompts in {samples.path} must be one string per image, got {prompts.dtype} of shape {prompts.shape}; store them as np.array(list_of_str).")
    return prompts
