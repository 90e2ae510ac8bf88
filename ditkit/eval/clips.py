"""`ditkit eval` on clips (arr_0 N×T×H×W×C): per-frame FD-EffNet against the reference clips' frames,
per-clip class accuracy and temporal consistency under the classifier trained on moving items
(32x32x1 moving-fashion-mnist frames), the item's motion against the reference clips', and FVD
with the I3D weights where the user brings them (see ditkit.video.metrics). Clips made from prompts
(a `prompts` array, as sample-npz writes for a text-to-video model) are scored for prompt following
instead of labels: the direction and item each prompt names (ditkit.video.captions), beside real
moving-fashion-mnist clips with their captions' directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import VIDEO_METRICS, EvalConfig
from ..utils.devices import resolve_device
from ..utils.io import cache_dir
from ..video.captions import format_motion_following, motion_following, real_motion_following
from ..video.metrics import I3D_WEIGHTS, I3DFeatures, clip_accuracy, load_i3d, motion_stats, temporal_consistency
from .classifier import CLASSIFIER_IMAGE, FMNIST_CLASSES, VIDEO_CLASSIFIER_PATH, classifier_predictions, load_classifier
from .features import EffNetFeatures, extract, reference_features
from .metrics import FeatureStats, frechet_distance, metric_plan
from .npz import FrameView, ImageArray, read_images, read_sample_prompts, resolve_images

CLIP_METRICS = ("FD-EffNet", "accuracy", *VIDEO_METRICS)
CLIP_NOTES = {
    "FD-EffNet": "Fréchet distance of EfficientNet-Lite0 features, frame by frame against the reference frames (not FID)",
    "accuracy": "share of clips whose majority class over frames is their label (the moving-items classifier)",
    "consistency": "mean share of a clip's frames that agree with its majority class",
    "speed": "mean distance the item's centroid moves per frame, pixels",
    "speed change": "mean |change of that speed| from frame to frame",
    "vanished": "share of frames whose item area is under half its clip's median",
    "split": "share of frames whose item falls into more than one part",
    "FVD": "Fréchet distance of I3D features of whole clips",
}
MOTION = ("speed", "speed change", "vanished", "split")


def find_i3d_weights(explicit: str | None, cache: str | Path | None = None) -> Path | None:
    """--i3d, else i3d_torchscript.pt in the ditkit cache; None if neither exists."""
    if explicit:
        return Path(explicit)
    path = cache_dir(cache) / I3D_WEIGHTS
    return path if path.is_file() else None


def evaluate_clips(cfg: EvalConfig, samples: ImageArray) -> dict:
    """The clip metrics of --metrics (default: all that can be computed here), the others skipped
    with the reason; the same result layout as the images' `evaluate`, plus "reference" (the motion
    statistics of the reference clips)."""
    image_only = sorted(set(cfg.metrics) - set(CLIP_METRICS))
    if image_only:
        raise ValueError(f"{', '.join(image_only)} {'is an image metric' if len(image_only) == 1 else 'are image metrics'}; "
                         f"for clips ditkit reports {', '.join(CLIP_METRICS)}.")  # fmt: skip
    wanted, skipped, cannot = metric_plan(cfg.metrics, CLIP_METRICS)

    frame = tuple(samples.shape[2:])
    prompts = read_sample_prompts(samples)
    if samples.labels is None and prompts is None:
        cannot(["accuracy"], "accuracy needs the clips' labels (a labels array in the .npz) or the prompts they were made from")
    elif frame != CLASSIFIER_IMAGE or (samples.labels is not None and samples.labels.max() >= FMNIST_CLASSES):
        top = f" with class ids up to {samples.labels.max()}" if samples.labels is not None else ""
        cannot(["accuracy", "consistency"], f"accuracy and consistency judge 32x32x1 moving-fashion-mnist frames (classes 0-9), the clips' frames are "
                                            f"{'x'.join(map(str, frame))}{top}")  # fmt: skip
    if not VIDEO_CLASSIFIER_PATH.is_file():  # shipped; a checkout without it: the script trains it
        cannot(["accuracy", "consistency"], f"accuracy and consistency need the classifier of moving items {VIDEO_CLASSIFIER_PATH}; "
                                            "train it with python scripts/train_fmnist_classifier.py --data moving-fashion-mnist")  # fmt: skip
    i3d = find_i3d_weights(cfg.i3d, cfg.cache_dir)
    if i3d is None:
        cannot(["FVD"], f"FVD needs the I3D weights {I3D_WEIGHTS} in {cache_dir(cfg.cache_dir)}; put them there or pass --i3d PATH")
    ref = None
    if any(m in wanted for m in ("FD-EffNet", "motion", "FVD")):
        if not cfg.ref:
            cannot(["FD-EffNet", "motion", "FVD"], "FD-EffNet, motion and FVD compare with reference clips; pass --ref (moving-fashion-mnist, or an .npz of clips)")
        else:
            ref = read_images(resolve_images(cfg.ref, "reference", cfg.cache_dir), "reference")
            if not ref.clips or tuple(ref.shape[2:]) != frame:
                cannot(["FD-EffNet", "motion", "FVD"], f"the reference must be clips with {'x'.join(map(str, frame))} frames like the samples, "
                                                       f"it is {'x'.join(map(str, ref.shape[1:]))}")  # fmt: skip
            elif ref.shape[1] != samples.shape[1]:
                cannot(["FVD"], f"FVD compares clips of one length; the samples have {samples.shape[1]} frames, the reference {ref.shape[1]}")
    device = resolve_device(cfg.device)
    nets = {}
    if "FD-EffNet" in wanted:
        nets["FD-EffNet"] = (EffNetFeatures(device=device), FrameView(samples), FrameView(ref), "pool")
    if "FVD" in wanted:
        nets["FVD"] = (I3DFeatures(load_i3d(i3d, device), device), samples, ref, "logits")
    for metric, (net, x, r, feature) in list(nets.items()):
        dim = net.dims[feature]
        if min(len(x), len(r)) <= dim:
            cannot([metric], f"{metric} needs more than {dim} {'frames' if metric == 'FD-EffNet' else 'clips'} on each side ({dim}-d features), "
                             f"got {len(x)} and {len(r)}; use more clips")  # fmt: skip
            nets.pop(metric)
    if not wanted:
        raise ValueError(f"none of the metrics can be computed: {'; '.join(skipped)}.")
    metrics: dict[str, float] = {}
    for metric, (net, x, r, feature) in nets.items():
        ref_stats, _ = reference_features(net, r, cfg.cache_dir, batch_size=cfg.batch_size)
        metrics[metric] = frechet_distance(FeatureStats.fit(extract(net, x, cfg.batch_size, desc=f"samples {net.name}")[feature]), ref_stats[feature])
    clips = np.concatenate(list(samples.batches(1024))) if {"accuracy", "consistency", "motion"} & set(wanted) else None
    if "accuracy" in wanted or "consistency" in wanted:
        frames = clips.reshape(-1, *clips.shape[2:])
        classifier = load_classifier(VIDEO_CLASSIFIER_PATH)[0]
        preds = classifier_predictions(classifier, frames, device=device).reshape(clips.shape[:2])
        if "accuracy" in wanted and samples.labels is not None:
            metrics["accuracy"] = clip_accuracy(preds, samples.labels)
        if "accuracy" in wanted and prompts is not None:  # the item and direction each prompt names, beside real clips'
            following = motion_following(clips, prompts, preds)
            following["real"] = real_motion_following(len(clips), clips.shape[1], lambda x: classifier_predictions(classifier, x, device=device))
        if "consistency" in wanted:
            metrics["consistency"] = temporal_consistency(preds)
    reference = {}
    if "motion" in wanted:
        metrics.update(motion_stats(clips))
        reference = motion_stats(np.concatenate(list(ref.batches(1024))))
    return {"kind": "clips", "samples": str(samples.path), "ref": str(ref.path) if ref is not None else None, "num_samples": len(samples),
            "num_ref": len(ref) if ref is not None else 0, "metrics": metrics, "reference": reference, "skipped": skipped,
            **({"prompt_following": following} if prompts is not None and "accuracy" in wanted else {})}  # fmt: skip


def format_clip_table(result: dict) -> str:
    against = f" vs {result['num_ref']} reference clips ({result['ref']})" if result["ref"] is not None else ""
    lines = [f"{result['num_samples']} clips ({result['samples']}){against}"]
    for name, value in result["metrics"].items():
        real = result["reference"].get(name)
        beside = f"   (reference {real:.4f})" if real is not None else ""
        lines.append(f"  {name:<12} {value:>10.4f}{beside}   {CLIP_NOTES.get(name, '')}")
    if "prompt_following" in result:
        following = dict(result["prompt_following"])
        lines += format_motion_following(following, following.pop("real", None))
    lines += [f"  skipped {s}." for s in result["skipped"]]
    return "\n".join(lines)
