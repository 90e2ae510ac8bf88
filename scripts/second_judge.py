"""A second judge for class accuracy: an MLP on raw pixels (no convolutions, unlike the shipped
classifier), trained here on the Fashion-MNIST training split, scores samples .npz files. Headline
accuracies are reported beside its own test accuracy, so a figure that only the shipped CNN
believes shows up.

Clips (arr_0 N×T×32×32×1, moving-fashion-mnist's frames) are judged frame by frame by another MLP
that sees the 20x20 window around each frame's centroid, trained on such windows of real frames (no
convolutions, unlike the shipped classifier of moving items): per-clip
accuracy (the majority over frames) and temporal consistency, beside its test accuracy on crops of
real frames.

    python scripts/second_judge.py results/bundle/s10k.npz [more.npz ...] [--epochs 8] [--seed 0]

A text-to-image model's samples (a `prompts` array, as sample-npz writes it) are judged against
the class each prompt names, overall and per prompt group (seen, unseen, held-out).

Prints the MLP's test accuracy and, for each file, its accuracy and the ratio to the test
accuracy (about 40 s on 2 idle cores).
"""

import argparse

import numpy as np
import torch
from torch import nn

from ditkit.eval.classifier import moving_frames
from ditkit.eval.npz import fashion_mnist, read_images, read_sample_prompts
from ditkit.text.captions import parse_prompt
from ditkit.text.prompts import GROUPS, prompt_following
from ditkit.video.metrics import centroids, clip_accuracy, temporal_consistency
from ditkit.video.moving import ITEM


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images, dtype=np.float32)).reshape(len(images), -1) / 127.5 - 1


def crops(frames: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 1) frames -> (N, ITEM, ITEM) windows centred on each frame's foreground centroid."""
    c = np.nan_to_num(centroids(frames[:, None])[:, 0], nan=16.0)  # (N, 2) as (x, y)
    corner = np.clip(np.rint(c - ITEM / 2).astype(int), 0, 32 - ITEM)
    return np.stack([f[y : y + ITEM, x : x + ITEM, 0] for f, (x, y) in zip(frames, corner)])


def train_mlp(epochs: int, seed: int, side: int = 32) -> tuple[nn.Module, float]:
    """The pixel MLP on 32x32 Fashion-MNIST, or (side=ITEM) on the 20x20 crops of moving-fashion-mnist frames."""
    torch.manual_seed(seed)
    if side == 32:
        images, labels = fashion_mnist("train")
    else:
        frames, labels = moving_frames("train", np.random.default_rng(seed))
        images = crops(frames)
    x, y = to_input(images), torch.from_numpy(labels)
    model = nn.Sequential(nn.Linear(side * side, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * (len(x) // 256))
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(len(x) // 256):
            idx = order[i * 256 : (i + 1) * 256]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    if side != 32:
        frames, test_labels = moving_frames("test", np.random.default_rng(seed + 1))
        return model, accuracy(model, crops(frames), test_labels)
    test, test_labels = fashion_mnist("test")
    return model, accuracy(model, test, test_labels)


@torch.no_grad()
def predictions(model: nn.Module, images: np.ndarray) -> np.ndarray:
    return torch.cat([model(to_input(images[i : i + 2048])).argmax(1) for i in range(0, len(images), 2048)]).numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions(model, images) == np.asarray(labels)).mean())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", nargs="+", help="ADM-style .npz files with arr_0 (N, 32, 32, 1) or clips (N, T, 32, 32, 1), and labels")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    judges = {}  # side -> (model, test accuracy), trained when first needed
    for path in args.samples:
        samples = read_images(path)
        prompts, labels = read_sample_prompts(samples), samples.labels
        if prompts is not None:  # a text model's samples: judged against the class each prompt names
            classes = [parse_prompt(str(q))[0] for q in prompts]
            if None in classes:
                raise SystemExit(f"{path} has prompts that name no Fashion-MNIST class; the judge can only score prompts that name one.")
            labels = np.array(classes)
        if labels is None:
            raise SystemExit(f"{path} has no labels; sample it with ditkit sample-npz, which stores them.")
        side = ITEM if samples.clips else 32
        if side not in judges:
            judges[side] = train_mlp(args.epochs, args.seed, side)
            print(f"second judge (pixel MLP{' on 20x20 crops around the centroid' if samples.clips else ''}): test accuracy {judges[side][1]:.3f}")
        model, test_acc = judges[side]
        images = np.concatenate(list(samples.batches(4096)))
        if samples.clips:
            n, t = images.shape[:2]
            preds = predictions(model, crops(images.reshape(n * t, *images.shape[2:]))).reshape(n, t)
            acc = clip_accuracy(preds, labels)
            print(f"{path}: per-clip accuracy {acc:.3f} ({acc / test_acc:.2f} of its test accuracy), "
                  f"temporal consistency {temporal_consistency(preds):.3f}, {n} clips")
        else:
            preds = predictions(model, images)
            acc = float((preds == labels).mean())
            follow = prompt_following(images, prompts, preds) if prompts is not None else {}  # ditkit eval's groups, this judge's classes
            by_group = "; by prompt group: " + ", ".join(f"{g} {follow[g]['class_accuracy']:.3f}" for g in GROUPS if g in follow) if follow else ""
            print(f"{path}: accuracy {acc:.3f} ({acc / test_acc:.2f} of its test accuracy), {len(labels)} samples{by_group}")
