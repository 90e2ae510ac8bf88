"""`ditkit study`: the paper's design space and scaling study, on a budget you choose.

Every config of a grid trains with ditkit's Trainer for the same number of steps, checkpointing
every `eval_every` steps; each checkpoint's EMA weights are then sampled and scored offline:
FD-EffNet (the Fréchet distance in EfficientNet-Lite0 features; not FID) against the data's
held-out images, and, on Fashion-MNIST, the class accuracy of the samples under the shipped
classifier. The grids are the paper's:

- model size x patch size (Table 1; Figures 2, 6 and 8): quality over training steps per config,
  and final quality against Gflops;
- the four conditioning blocks at one config (Figure 5);
- a U-Net baseline (diffusers' UNet2DModel, ADM's layout) with the same diffusion, data and
  budget, sized to the Gflops of a chosen DiT config.

Layout of OUT (a killed study run again with the same flags picks up where it stopped):

    study.json                the settings, checked on every restart
    reference.npz, cache/     the reference images and their feature statistics
    runs/NAME/run.json        the run: model, sizes, params, Gflops, its TrainConfig
    runs/NAME/NNN-MODEL/      the Trainer's experiment: checkpoints/, model/, log.csv
    runs/NAME/samples/*.npz   the samples scored at each step (ADM format: ditkit eval reads them)
    runs/NAME/evals.json      step -> metrics, written after each evaluation
    runs/NAME/done.json       the run is trained and evaluated
    results.csv, results.json one row per (run, step)
    *.png                     the plots
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import DiTConfig, Sampling, StudyConfig, TrainConfig, UNetConfig, scaled_sizes
from .data import build_dataset, is_latent_store
from .eval.classifier import classifier_accuracy, load_classifier
from .eval.features import EffNetFeatures, extract, reference_features
from .eval.metrics import FeatureStats, frechet_distance
from .eval.npz import read_images
from .flops import count_macs, measure
from .models import DiT
from .models.unet import UNetBaseline
from .objectives import GaussianDiffusion
from .pipeline import Pipeline
from .study_plots import UNET, plot_results
from .train import ClassTask, Trainer
from .utils.devices import resolve_device
from .utils.images import to_uint8
from .utils.io import atomic_write, read_pt, save_npz
from .utils.runs import checkpoint_steps, latest_checkpoint

RESULT_COLUMNS = ("run", "model", "block", "patch", "params", "gflops", "step", "fd_effnet", "accuracy")
# Settings that may change between invocations of one study: which runs exist, and how they run.
FREE_SETTINGS = ("out", "models", "blocks", "unet", "device", "num_workers", "log_every")



# ---------------------------------------------------------------------------------------------
# The U-Net baseline


def unet_cost(config: UNetConfig) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of a U-Net, counted as flops.measure counts a DiT."""
    with torch.device("meta"):
        model = UNetBaseline(config)
    return sum(p.numel() for p in model.parameters()), count_macs(model)


def size_unet(target_macs: int, like: DiTConfig, max_channels: int = 1024) -> UNetConfig:
    """The U-Net for `like`'s data whose multiply-adds come closest (in ratio) to `target_macs`:
    base widths are multiples of 8, and the count grows with the width, so a bisection finds it."""
    widths = list(range(8, max_channels + 1, 8))
    macs = {}

    def cost(i: int) -> int:
        if i not in macs:
            macs[i] = unet_cost(UNetConfig.from_dit(like, widths[i]))[1]
        return macs[i]

    lo, hi = 0, len(widths) - 1
    while lo < hi:  # the first width whose count reaches the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if cost(mid) < target_macs else (lo, mid)
    best = min({max(lo - 1, 0), lo}, key=lambda i: abs(math.log(cost(i) / target_macs)))
    return UNetConfig.from_dit(like, widths[best])


# ---------------------------------------------------------------------------------------------
# The runs


@dataclass(frozen=True)
class Run:
    """One config of the study: its Trainer settings, and the U-Net's layout for the baseline."""

    name: str
    model: str  # a preset, or UNET
    block: str | None
    train: TrainConfig
    unet: UNetConfig | None = None

    @property
    def patch(self) -> int | None:
        return None if self.unet else int(self.model.rpartition("/")[2])

    def factory(self):
        if self.unet is None:
            return DiT
        base = self.unet.base_channels
        return lambda c: UNetBaseline(UNetConfig.from_dit(c, base))

    def build(self, dit_config: DiTConfig) -> nn.Module:
        return self.factory()(dit_config)


@dataclass(frozen=True)
class DataInfo:
    input_size: int
    in_channels: int
    num_classes: int
    fashion_mnist: bool


def data_info(cfg: StudyConfig) -> DataInfo:
    path = Path(cfg.data_path)
    if is_latent_store(path):
        raise ValueError(f"{cfg.data_path} is a latent store; the study scores pixel-space samples, so pass the images (e.g. fashion-mnist).")
    ds = build_dataset(cfg.data_path, flip=False, split="train" if path.exists() else "test")
    return DataInfo(ds.image_size, ds.channels, ds.num_classes, cfg.data_path == "fashion-mnist" and not path.exists())


def _train_config(cfg: StudyConfig, run_dir: Path, preset: str, block: str) -> TrainConfig:
    return TrainConfig(
        data_path=cfg.data_path, results_dir=str(run_dir), model=preset, block=block,
        **scaled_sizes(preset, cfg.width_divisor, cfg.depth_divisor),
        epochs=cfg.steps,  # every epoch has at least one step, so max_steps is what stops the run
        max_steps=cfg.steps, global_batch_size=cfg.global_batch_size, global_seed=cfg.seed, lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, ema_decay=cfg.ema_decay, num_workers=cfg.num_workers, log_every=min(cfg.log_every, cfg.steps),
        ckpt_every=cfg.eval_every, keep_last=1, keep_every=cfg.eval_every,  # every evaluation step is kept
        precision=cfg.precision, device=cfg.device,
    )  # fmt: skip


def dit_config(train: TrainConfig, info: DataInfo) -> DiTConfig:
    """The DiTConfig the Trainer will build for `train` on this data."""
    return train.model_config(info.num_classes, info.input_size, info.in_channels)


def plan_runs(cfg: StudyConfig, info: DataInfo) -> list[Run]:
    """The size x patch grid, then the other block designs at `block_model`, then the U-Net."""
    runs_dir = Path(cfg.out) / "runs"
    keys = [(m, "adaln_zero") for m in cfg.models] + [(cfg.block_model, b) for b in cfg.blocks]
    runs = []
    for model, block in dict.fromkeys(keys):  # the adaLN-Zero block at block_model is one run
        name = f"{model.replace('/', '-')}-{block}"
        runs.append(Run(name, model, block, _train_config(cfg, runs_dir / name, model, block)))
    if cfg.unet:
        train = _train_config(cfg, runs_dir / "unet", cfg.unet_match, "adaln_zero")  # DiTConfig: data fields only
        saved = read_json(runs_dir / "unet" / "run.json")
        if saved and saved.get("unet"):  # a started run keeps the layout of its checkpoints
            unet = UNetConfig(**saved["unet"])
        else:
            unet = size_unet(measure(dit_config(train, info)).macs, dit_config(train, info))
        runs.append(Run("unet", UNET, None, train, unet))
    return runs


def describe_run(run: Run, info: DataInfo) -> dict:
    """run.json: what the run is, its size and compute, and its Trainer settings."""
    c = dit_config(run.train, info)
    if run.unet is not None:
        params, macs = unet_cost(run.unet)
        trainable = params
        sizes = {"unet": asdict(run.unet), "block_out_channels": list(run.unet.block_out_channels)}
    else:
        cost = measure(c, run.model)
        params, trainable, macs = cost.params, cost.trainable_params, cost.macs
        sizes = {"hidden_size": c.hidden_size, "depth": c.depth, "num_heads": c.num_heads}
    return {"run": run.name, "model": run.model, "block": run.block, "patch": run.patch, "params": params,
            "trainable_params": trainable, "gflops": macs / 1e9, **sizes, "train": asdict(run.train)}  # fmt: skip


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def check_settings(cfg: StudyConfig) -> None:
    """A study folder keeps the settings it was started with: otherwise its runs would not compare."""
    path = Path(cfg.out) / "study.json"
    saved = read_json(path)
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as the lists the file holds
    if saved is not None:
        changed = [k for k in now if k not in FREE_SETTINGS and k in saved and saved[k] != now[k]]
        if changed == ["steps"] and now["steps"] > saved["steps"]:
            changed = []  # a bigger budget extends every run from its last checkpoint (lr is flat after warm-up)
        if changed:
            diff = ", ".join(f"{k}: {saved[k]} -> {now[k]}" for k in changed)
            raise ValueError(f"{cfg.out} was started with other settings ({diff}); use the same settings to continue it, or a new --out.")
    write_json(path, now)


def ema_warning(cfg: StudyConfig, left: float = 0.1) -> str | None:
    """A warning when the initial weights still make up more than `left` of the EMA weights that are
    scored at the end of a run (decay ** steps): then every run scores like its initialisation."""
    share = cfg.ema_decay**cfg.steps
    if share <= left:
        return None
    suggest = 0.01 ** (1 / cfg.steps)  # leaves 1% of the initial weights after the budget
    return (f"--ema-decay {cfg.ema_decay:g} averages about {1 / (1 - cfg.ema_decay):.0f} steps, but each run trains {cfg.steps}: "
            f"{share:.0%} of the scored EMA weights are still the initial ones, which flattens every run's scores; "
            f"use --ema-decay {math.floor(suggest * 1000) / 1000:g} or less (0 scores the raw weights), or more --steps.")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Evaluation


def reference_npz(cfg: StudyConfig, out: Path) -> Path:
    """The data's held-out images as an ADM .npz (named datasets: their test split; an image folder
    has none, so its own images), written once."""

    path = out / "reference.npz"
    if path.exists():
        return path
    held_out = not Path(cfg.data_path).exists()
    ds = build_dataset(cfg.data_path, flip=False, split="test" if held_out else "train")
    images, labels = [], []
    for x, y in torch.utils.data.DataLoader(ds, batch_size=512, num_workers=0):
        images.append(to_uint8(x))
        labels.append(y.numpy())
    return save_npz(path, arr_0=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64))


class Scorer:
    """Samples a model and scores the samples: FD-EffNet against the reference images and, for
    Fashion-MNIST, the class accuracy. The Fréchet distance is taken from the covariances even
    with fewer samples than feature dimensions (unlike `ditkit eval`, which refuses): the study
    compares runs at one sample count, where that bias is shared."""

    def __init__(self, cfg: StudyConfig, info: DataInfo, out: Path):

        self.cfg, self.info = cfg, info
        self.device = resolve_device(cfg.device)
        self.net = EffNetFeatures(device=self.device)
        self.cache = out / "cache"
        ref = read_images(reference_npz(cfg, out), "reference")
        if len(ref) < 2:
            raise ValueError(f"{cfg.data_path} has {len(ref)} held-out image(s); FD-EffNet needs at least 2 reference images.")
        self.ref_stats = reference_features(self.net, ref, self.cache, batch_size=cfg.eval_batch_size)[0]["pool"]
        self.classifier = load_classifier()[0] if info.fashion_mnist else None
        # The same labels and noise for every run and step, so differences are the models'.
        self.labels = np.random.default_rng(cfg.seed).integers(0, info.num_classes, size=cfg.num_eval_samples)

    @torch.no_grad()
    def images(self, model: nn.Module) -> np.ndarray:
        cfg, c = self.cfg, model.config
        model = model.to(self.device).eval()
        sampling = Sampling(sampler=cfg.sampler, steps=cfg.num_sampling_steps, cfg_scale=cfg.cfg_scale, precision=cfg.precision)
        pipe = Pipeline(model, GaussianDiffusion(learn_sigma=c.learn_sigma), sampling, device=self.device)
        noise_g = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same noise on every device
        g = torch.Generator(device=self.device).manual_seed(cfg.seed)  # DDPM's per-step noise
        out = []
        for i in tqdm(range(0, cfg.num_eval_samples, cfg.eval_batch_size), desc="eval samples", leave=False):
            y = torch.from_numpy(self.labels[i : i + cfg.eval_batch_size]).to(self.device)
            noise = torch.randn(len(y), c.in_channels, c.input_size, c.input_size, generator=noise_g).to(self.device)
            out.append(to_uint8(pipe.images(y, noise=noise, generator=g)))  # pixel models: x0 clipped to [-1, 1]
        return np.concatenate(out)

    def score(self, model: nn.Module, samples_path: Path) -> dict[str, float | None]:

        save_npz(samples_path, arr_0=self.images(model), labels=self.labels)
        samples = read_images(samples_path)
        feats = extract(self.net, samples, self.cfg.eval_batch_size, desc="eval features")["pool"]
        metrics = {"fd_effnet": frechet_distance(FeatureStats.fit(feats), self.ref_stats), "accuracy": None}
        if self.classifier is not None:
            metrics["accuracy"] = classifier_accuracy(self.classifier, samples, samples.labels, device=self.device)
        return metrics


def eval_steps(cfg: StudyConfig) -> list[int]:
    return sorted({*range(cfg.eval_every, cfg.steps + 1, cfg.eval_every), cfg.steps})


def load_checkpoint_model(run: Run, path: Path) -> nn.Module:
    """The EMA weights of a training checkpoint, in the run's network."""
    ck = read_pt(path)
    model = run.build(DiTConfig(**ck["model_config"]))
    model.load_state_dict(ck["ema"])
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The study


class Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self._scorer: Scorer | None = None

    @property
    def scorer(self) -> Scorer:  # loaded on first use: a finished study re-plots without it
        if self._scorer is None:
            self._scorer = Scorer(self.cfg, self.info, self.out)
        return self._scorer

    def run(self) -> Path:
        cfg = self.cfg
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("ditkit study runs in one process; start it without torchrun (each run uses the whole device).")
        self.out.mkdir(parents=True, exist_ok=True)
        check_settings(cfg)
        warning = ema_warning(cfg)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.info = data_info(cfg)
        runs = plan_runs(cfg, self.info)
        for run in runs:  # every config is built before any training, so a bad one fails at once
            dit_config(run.train, self.info)
        start = time.perf_counter()
        for i, run in enumerate(runs, 1):
            self.run_one(run, f"[{i}/{len(runs)}]")
            self.write_results(runs)
        print(f"study done in {time.perf_counter() - start:.0f}s: {self.out / 'results.csv'} and plots in {self.out}", flush=True)
        return self.out

    def run_one(self, run: Run, tag: str) -> None:
        cfg, run_dir = self.cfg, Path(run.train.results_dir)
        done = read_json(run_dir / "done.json")
        if done is not None and done.get("steps") == cfg.steps:
            print(f"{tag} {run.name}: done", flush=True)
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = read_json(run_dir / "run.json") or describe_run(run, self.info)
        write_json(run_dir / "run.json", meta)
        evals = {int(k): v for k, v in (read_json(run_dir / "evals.json") or {}).items()}
        latest = latest_checkpoint(run_dir)
        at = checkpoint_steps(latest.parent)[-1] if latest else 0
        trainable = f" ({meta['trainable_params']:,} trainable)" if "trainable_params" in meta else ""  # as the Trainer counts
        print(f"{tag} {run.name}: {meta['params']:,} parameters{trainable}, {meta['gflops']:.3g} Gflops, step {at} of {cfg.steps}", flush=True)
        if at < cfg.steps:
            evals = {s: m for s, m in evals.items() if s <= at}  # later checkpoints are being rewritten
            write_json(run_dir / "evals.json", evals)
            trainer = Trainer(replace(run.train, resume="latest" if latest else None), task=ClassTask(run.factory()))
            trainer.run()
            latest = latest_checkpoint(run_dir)
        ckpts = latest.parent
        have = set(checkpoint_steps(ckpts))
        for step in eval_steps(cfg):
            if step in evals:
                continue
            if step not in have:
                raise FileNotFoundError(f"{ckpts} has no checkpoint for step {step}; delete {run_dir} to train {run.name} again.")
            metrics = self.scorer.score(load_checkpoint_model(run, ckpts / f"{step:07d}.pt"), run_dir / "samples" / f"{step:07d}.npz")
            evals[step] = metrics
            write_json(run_dir / "evals.json", evals)
            acc = f", accuracy {metrics['accuracy']:.3f}" if metrics["accuracy"] is not None else ""
            print(f"{tag} {run.name} step {step}: FD-EffNet {metrics['fd_effnet']:.2f}{acc}", flush=True)
        write_json(run_dir / "done.json", {"steps": cfg.steps, "evaluated": sorted(evals)})

    def rows(self, runs: list[Run]) -> list[dict]:
        rows = []
        for run in runs:
            run_dir = Path(run.train.results_dir)
            meta = read_json(run_dir / "run.json")
            if meta is None:  # not started yet
                continue
            evals = read_json(run_dir / "evals.json") or {}
            for step, m in sorted((int(k), v) for k, v in evals.items()):
                rows.append({**{k: meta[k] for k in RESULT_COLUMNS[:6]}, "step": step, **m})
        return rows

    def write_results(self, runs: list[Run]) -> None:
        rows = self.rows(runs)

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
                w.writeheader()
                w.writerows({k: "" if r[k] is None else r[k] for k in RESULT_COLUMNS} for r in rows)

        atomic_write(self.out / "results.csv", write_csv)
        notes = {"fd_effnet": f"Fréchet distance of EfficientNet-Lite0 features (not FID), {self.cfg.num_eval_samples} samples "
                              f"({self.cfg.sampler}, {self.cfg.num_sampling_steps} steps, cfg {self.cfg.cfg_scale}) against the reference set",
                 "accuracy": "Fashion-MNIST classifier accuracy on the samples' labels",
                 "gflops": "G multiply-adds per forward of one image", "params": "parameters"}  # fmt: skip
        write_json(self.out / "results.json", {"study": asdict(self.cfg), "columns": notes, "rows": rows})
        plot_results(rows, self.cfg, self.out)


def run_study(cfg: StudyConfig) -> Path:
    return Study(cfg).run()
