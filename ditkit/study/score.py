"""Scoring a study's runs: sample each run's EMA weights and measure the samples, and time a run's
training steps alone (for the wall-clock plot)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import DiTConfig, ObjectiveConfig, Sampling, StudyConfig, TrainConfig, UViTConfig
from ..data import build_dataset
from ..eval.classifier import classifier_accuracy, load_classifier
from ..eval.features import EffNetFeatures, extract, reference_features
from ..eval.metrics import FeatureStats, frechet_distance
from ..eval.npz import read_images
from ..objectives import build_objective
from ..pipeline import Pipeline
from ..train import ClassTask, Trainer
from ..utils.devices import resolve_device
from ..utils.images import to_uint8
from ..utils.io import read_pt, save_npz
from .plan import DataInfo, Run

TIMED_STEPS, WARMUP_STEPS = 30, 5  # steps timed per run (after the warm-up) for its images/s


def reference_npz(data_path: str, out: Path) -> Path:
    """The data's held-out images as an ADM .npz (named datasets: their test split; an image folder
    has none, so its own images), written once."""
    path = out / "reference.npz"
    if path.exists():
        return path
    held_out = not Path(data_path).exists()
    ds = build_dataset(data_path, flip=False, split="test" if held_out else "train")
    images, labels = [], []
    for x, y in torch.utils.data.DataLoader(ds, batch_size=512, num_workers=0):
        images.append(to_uint8(x))
        labels.append(y.numpy())
    return save_npz(path, arr_0=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64))


def eval_sampling(cfg: StudyConfig, recipe: TrainConfig) -> Sampling:
    """The evaluation's sampling: the study's flags over the recipe's recorded defaults."""
    interval = tuple(recipe.default_cfg_interval) or None
    return Sampling(sampler=cfg.sampler or recipe.default_sampler or ("heun" if recipe.objective == "flow" else "ddim"),
                    steps=cfg.num_sampling_steps or recipe.default_steps or 10,
                    cfg_scale=cfg.cfg_scale if cfg.cfg_scale is not None else (recipe.default_cfg_scale or 1.0),
                    cfg_interval=interval if cfg.cfg_scale is None else None)  # fmt: skip


class Scorer:
    """Samples a model and scores the samples: FD-EffNet against the reference images and, for
    Fashion-MNIST, the class accuracy. The Fréchet distance is taken from the covariances even
    with fewer samples than feature dimensions (unlike `ditkit eval`, which refuses): the study
    compares runs at one sample count, where that bias is shared."""

    def __init__(self, cfg: StudyConfig, info: DataInfo, data_path: str, sampling: Sampling, out: Path):
        self.cfg, self.info, self.sampling = cfg, info, sampling
        self.device = resolve_device(cfg.device)
        self.net = EffNetFeatures(device=self.device)
        ref = read_images(reference_npz(data_path, out), "reference")
        if len(ref) < 2:
            raise ValueError(f"{data_path} has {len(ref)} held-out image(s); FD-EffNet needs at least 2 reference images.")
        self.ref_stats = reference_features(self.net, ref, out / "cache", batch_size=cfg.eval_batch_size)[0]["pool"]
        self.classifier = load_classifier()[0] if info.fashion_mnist else None
        # The same labels and noise for every run, so differences are the models'.
        self.labels = np.random.default_rng(0).integers(0, info.num_classes, size=cfg.num_eval_samples)

    @torch.no_grad()
    def images(self, model: nn.Module, objective) -> np.ndarray:
        cfg, c = self.cfg, model.config
        pipe = Pipeline(model.to(self.device).eval(), objective, self.sampling, device=self.device)
        noise_g = torch.Generator().manual_seed(0)  # on the CPU: the same noise on every device
        g = torch.Generator(device=self.device).manual_seed(0)  # the per-step noise of stochastic samplers
        out = []
        for i in tqdm(range(0, cfg.num_eval_samples, cfg.eval_batch_size), desc="eval samples", leave=False):
            y = torch.from_numpy(self.labels[i : i + cfg.eval_batch_size]).to(self.device)
            noise = torch.randn(len(y), c.in_channels, c.input_size, c.input_size, generator=noise_g).to(self.device)
            out.append(to_uint8(pipe.images(y, noise=noise, generator=g)))  # pixel models: clipped to [-1, 1]
        return np.concatenate(out)

    def score(self, model: nn.Module, objective, samples_path: Path) -> dict[str, float | None]:
        save_npz(samples_path, arr_0=self.images(model, objective), labels=self.labels)
        samples = read_images(samples_path)
        feats = extract(self.net, samples, self.cfg.eval_batch_size, desc="eval features")["pool"]
        metrics = {"fd_effnet": frechet_distance(FeatureStats.fit(feats), self.ref_stats), "accuracy": None}
        if self.classifier is not None:
            metrics["accuracy"] = classifier_accuracy(self.classifier, samples, samples.labels, device=self.device)
        return metrics


def load_checkpoint_model(run: Run, path: Path) -> tuple[nn.Module, object]:
    """(the EMA weights of a training checkpoint in the run's network, the objective it records)."""
    ck = read_pt(path)
    model = run.build((UViTConfig if run.train.uvit else DiTConfig)(**ck["model_config"]))
    model.load_state_dict(ck["ema"])
    objective = build_objective(ObjectiveConfig(**ck.get("objective", {"objective": "gaussian"})), learn_sigma=model.config.learn_sigma)
    return model.eval(), objective


def time_training(run: Run, scratch: Path) -> dict:
    """The run's training images/s measured on TIMED_STEPS steps after WARMUP_STEPS, in a scratch
    folder: what one step costs on this machine, for the wall-clock plot. Both the wall clock (run
    it alone) and the process's CPU time, which other jobs on a shared machine inflate far less: with
    one thread (OMP_NUM_THREADS=1), images per CPU-second are the images/s of one idle core."""
    cfg = replace(run.train, results_dir=str(scratch), max_steps=TIMED_STEPS + WARMUP_STEPS, ckpt_every=10**9)
    trainer = Trainer(cfg, task=ClassTask(run.factory()))
    loader, sampler = trainer.loader()
    sampler.set_epoch(0, 0)
    batches = iter(loader)
    for i in range(TIMED_STEPS + WARMUP_STEPS):
        if i == WARMUP_STEPS:
            start, cpu = time.perf_counter(), time.process_time()
        x, y = next(batches)
        trainer.train_step(x.to(trainer.d.device), y.to(trainer.d.device))
        trainer.step += 1
    images = TIMED_STEPS * cfg.global_batch_size
    return {"images_per_s": images / (time.perf_counter() - start), "images_per_cpu_s": images / (time.process_time() - cpu),
            "timed_steps": TIMED_STEPS, "threads": torch.get_num_threads()}  # fmt: skip
