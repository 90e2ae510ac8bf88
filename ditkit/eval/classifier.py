"""The small Fashion-MNIST classifier behind the class-accuracy metric, and its training."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..data import FASHION_MNIST_CLASSES
from ..utils.io import atomic_write
from .npz import ImageArray, fashion_mnist, to_float

CLASSIFIER_PATH = Path(__file__).parent.parent / "assets" / "fmnist_classifier.safetensors"
CLASSIFIER_IMAGE = (32, 32, 1)
FMNIST_CLASSES = len(FASHION_MNIST_CLASSES)
TRAIN_SHIFT = 2  # classifier augmentation: shifts up to the 2-px black border of the 32-px frame


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
    return to_float(images, torch.device(device)) * 2 - 1  # (N, 1, 32, 32) in [-1, 1], as the samples


def train_classifier(out: str | Path = CLASSIFIER_PATH, epochs: int = 10, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, log: Callable[[str], None] = print) -> float:  # fmt: skip
    """Train FashionClassifier on the Fashion-MNIST training split (random flips and +-2 px
    shifts), save it to `out` (safetensors, test accuracy in its metadata) and return the test
    accuracy. The shipped weights come from `python scripts/train_fmnist_classifier.py`."""
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the Fashion-MNIST classifier {path} is missing; train it with python scripts/train_fmnist_classifier.py.")
    model = FashionClassifier()
    model.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return model.eval(), meta


@torch.no_grad()
def classifier_predictions(model: nn.Module, images: np.ndarray | ImageArray, batch_size: int = 512,
                           device: torch.device | str = "cpu") -> np.ndarray:  # fmt: skip
    """The predicted class of every image, (N,) int64."""
    was_training = model.training
    model.eval().to(device)
    batches = images.batches(batch_size) if isinstance(images, ImageArray) else (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    preds = [model(_classifier_input(b, device)).argmax(1).cpu() for b in batches]
    model.train(was_training)
    return torch.cat(preds).numpy()


def classifier_accuracy(model: nn.Module, images: np.ndarray | ImageArray, labels: np.ndarray, batch_size: int = 512,
                        device: torch.device | str = "cpu") -> float:  # fmt: skip
    """Share of images whose predicted class is their label."""
    return (classifier_predictions(model, images, batch_size, device) == labels).mean().item()


def classifier_judge(path: str | Path | None = None, device: torch.device | str = "cpu") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A judge for preference tuning (ditkit dpo): the classifier's probability that each image
    (N, 1, 32, 32) in [-1, 1] shows its intended class y, (N,)."""
    model = load_classifier(path or CLASSIFIER_PATH)[0].to(device)

    @torch.no_grad()
    def judge(images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c, h, w = CLASSIFIER_IMAGE[2], CLASSIFIER_IMAGE[0], CLASSIFIER_IMAGE[1]
        if tuple(images.shape[1:]) != (c, h, w) or int(y.max()) >= FMNIST_CLASSES:
            raise ValueError(f"the Fashion-MNIST classifier judges {c}x{h}x{w} images of classes 0-{FMNIST_CLASSES - 1}, but this model makes "
                             f"{'x'.join(map(str, images.shape[1:]))} ones with classes up to {int(y.max())}; pass a judge of your own (ditkit.dpo.run_dpo(cfg, judge=...)).")  # fmt: skip
        return model(images.clamp(-1, 1).to(device)).softmax(1).gather(1, y.to(device)[:, None])[:, 0]

    return judge
