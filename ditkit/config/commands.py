"""Configs of the other commands: eval, extract, flops, study, export and ema."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .base import (
    ATTENTIONS,
    BAD_IMAGE_ACTIONS,
    BLOCK_ALIASES,
    BLOCKS,
    DEVICE_HELP,
    FLOPS_IMAGE_SIZE,
    FLOPS_IN_CHANNELS,
    METRICS,
    MMDIT_PRESETS,
    PRESETS,
    SAMPLERS,
    SD_VAE_FACTOR,
    SPLITS,
    STORE_DTYPES,
    STUDY_FAMILIES,
    STUDY_GRIDS,
    STUDY_MODELS,
    STUDY_SIZES,
    UVIT_PRESETS,
    VAE_HELP,
    VIDEO_METRICS,
    VIDEO_MMDIT_PRESETS,
    VIDEO_PRESETS,
    Config,
    nonnegative,
    option,
    positive,
)


@dataclass(frozen=True)
class EvalConfig(Config):
    """Evaluate samples against a reference set and report every metric that can be computed here,
    saying why any other is skipped: class accuracy (labelled 32x32x1 Fashion-MNIST samples, with
    the bundled classifier), FD-EffNet (offline; more samples and reference images than its 1280
    feature dimensions), and FID, sFID, Inception Score, precision and recall (ADM's definitions)
    when the FID Inception weights are available. --metrics asks for some by name: then one that
    cannot be computed is an error."""

    samples: str | None = field(default=None, metadata=option("samples .npz (arr_0 uint8 N×H×W×C, optional labels), or a dataset name such as fashion-mnist-train:10000"))
    ref: str | None = field(default=None, metadata=option("reference .npz in the same format, or fashion-mnist (its test split), moving-fashion-mnist (its test clips), each with an optional :N; not needed for --metrics accuracy"))
    metrics: tuple[str, ...] = field(default=(), metadata=option(f"metrics to report: {', '.join(METRICS)}; for clips FD-EffNet (per frame), accuracy (per clip), "
                                                                 f"{', '.join(VIDEO_METRICS)} (default: every one that can be computed)", choices=METRICS + VIDEO_METRICS))
    inception: str | None = field(default=None, metadata=option("FID Inception weights pt_inception-2015-12-05-6726825d.pth (default: look in ~/.cache/ditkit and torch hub's checkpoints; skip FID etc. if absent)"))
    batch_size: int = field(default=64, metadata=positive("images per feature-network batch"))
    device: str = field(default="auto", metadata=option(DEVICE_HELP))
    cache_dir: str | None = field(default=None, metadata=option("where reference statistics and dataset .npz files are kept (default: $XDG_CACHE_HOME/ditkit or ~/.cache/ditkit)"))
    i3d: str | None = field(default=None, metadata=option("clips: FVD's TorchScript I3D weights, i3d_torchscript.pt (default: look in the cache folder; skip FVD if absent)"))
    json: bool = field(default=False, metadata=option("print the results as JSON instead of a table"))

    def __post_init__(self):
        if isinstance(self.metrics, (list, tuple)):  # names in any case: fd-effnet, fid
            spelled = {m.lower(): m for m in METRICS}
            object.__setattr__(self, "metrics", tuple(spelled.get(m.lower(), m) if isinstance(m, str) else m for m in self.metrics))
        super().__post_init__()

    def check(self) -> None:
        if not self.samples:
            raise ValueError("--samples is required; pass the .npz written by ditkit sample-npz.")
        if not self.ref and not (self.metrics and set(self.metrics) <= {"accuracy", "consistency"}):
            raise ValueError("--ref is required; pass a reference .npz, fashion-mnist or moving-fashion-mnist (or ask for --metrics accuracy alone).")


@dataclass(frozen=True)
class ExtractConfig(Config):
    """Encode every image and its mirror image with the VAE into a latent store (posterior mean and
    log-variance). Training reads the store like any data path and draws a fresh sample of each
    latent every epoch. Under torchrun, each process encodes its share; an interrupted run
    resumes when started again with the same settings."""

    data_path: str | None = field(default=None, metadata=option("image folder or named dataset (fashion-mnist, mnist, digits)", aliases=("--data",)))
    image_size: int | None = field(default=None, metadata=positive("image size in pixels, a multiple of the VAE's factor (default: 256 for folders, the dataset's own for named ones)"))
    split: str = field(default="train", metadata=option("split of a named dataset", choices=SPLITS))
    vae: str = field(default="ema", metadata=option(VAE_HELP))
    batch_size: int = field(default=32, metadata=positive("images per process per VAE call (each goes with its mirror image)"))
    num_workers: int | None = field(default=None, metadata=nonnegative("data-loading processes per process (default: 4, or the cores there are where fewer)"))
    dtype: str = field(default="float32", metadata=option("storage type of the latents; float16 halves the disk space", choices=STORE_DTYPES))
    on_bad_image: str = field(default="skip", metadata=option("unreadable image: skip it (use the next one) or stop", choices=BAD_IMAGE_ACTIONS))
    device: str = field(default="auto", metadata=option("cpu, cuda, cuda:N, or auto (under torchrun: the process's local GPU)"))
    out: str = field(default="latents", metadata=option("output folder of the latent store"))

    def check(self) -> None:
        if not self.data_path:
            raise ValueError("no data given; pass --data-path with an image folder or a named dataset (fashion-mnist, mnist, digits).")


@dataclass(frozen=True)
class FlopsConfig(Config):
    """Parameters and G multiply-adds per forward (the paper's "Gflops") of DiT configs: the paper's
    presets, resized with the model flags if you like, or the model of a checkpoint (--ckpt bundled
    for the bundled one)."""

    model: tuple[str, ...] = field(default=(), metadata=option("presets to count (default: the 12 DiTs, or none with --ckpt; MMDiT-*: the text at 77 tokens; "
                                                                "U-ViT-*: with a null class; VDiT-*: clips of --frames)",
                                                                aliases=("--models",), choices=PRESETS + UVIT_PRESETS + MMDIT_PRESETS + VIDEO_PRESETS + VIDEO_MMDIT_PRESETS))
    ckpt: str | None = field(default=None, metadata=option("count the model of this checkpoint instead: a .pt, a model folder, a run folder, or 'bundled'"))
    block: tuple[str, ...] = field(default=(), metadata=option(f"block design(s): {', '.join(BLOCKS)} (default: adaln_zero, or the checkpoint's)", choices=BLOCKS + tuple(BLOCK_ALIASES)))
    depth: int | None = field(default=None, metadata=positive("override the depth of the presets (or the checkpoint's)"))
    hidden_size: int | None = field(default=None, metadata=positive("override the hidden size"))
    num_heads: int | None = field(default=None, metadata=positive("override the head count"))
    patch_size: int | None = field(default=None, metadata=positive("override the patch size"))
    image_size: int | None = field(default=None, metadata=positive(f"image size in pixels; 4-channel latent models see image_size/{SD_VAE_FACTOR} (default: {FLOPS_IMAGE_SIZE}, or the checkpoint's)"))
    input_size: int | None = field(default=None, metadata=positive("the model's input size (latent or pixels), overriding --image-size"))
    in_channels: int | None = field(default=None, metadata=positive("input channels: 4 for SD-VAE latents, 1 or 3 for pixel models (default: 4, or the checkpoint's)"))
    num_classes: int | None = field(default=None, metadata=positive("number of classes (default: 1000, or the checkpoint's)"))
    frames: int | None = field(default=None, metadata=positive("video models: frames per clip (default: 16, or the checkpoint's)"))
    attention: tuple[str, ...] = field(default=(), metadata=option(f"video models: attention arrangement(s), {', '.join(ATTENTIONS)} (default: joint, or the checkpoint's)", choices=ATTENTIONS))
    json: bool = field(default=False, metadata=option("print a JSON list instead of the table"))

    def check(self) -> None:
        object.__setattr__(self, "block", tuple(BLOCK_ALIASES.get(b, b) for b in self.block))
        if self.ckpt is not None and self.model:
            raise ValueError("--ckpt counts the checkpoint's model; drop --model (or drop --ckpt to count presets).")
        if self.ckpt is None:
            self.input_size_for(self.in_channels or FLOPS_IN_CHANNELS)  # a bad --image-size fails before anything is built

    def input_size_for(self, in_channels: int) -> int | None:
        """--input-size, else --image-size in the model's units (latent models: /8); None if neither is given."""
        if self.input_size is not None or self.image_size is None:
            return self.input_size
        if in_channels in (1, 3):
            return self.image_size
        if self.image_size % SD_VAE_FACTOR:
            raise ValueError(
                f"image size {self.image_size} is not divisible by the VAE's factor {SD_VAE_FACTOR}; "
                f"use a multiple of {SD_VAE_FACTOR} or give --input-size."
            )
        return self.image_size // SD_VAE_FACTOR


@dataclass(frozen=True)
class StudyConfig(Config):
    """The paper's design space, trained with a recipe (fmnist-fast by default) at a budget where
    models learn: DiT model size x patch size (p = 1 too), the four conditioning blocks, and the
    backbones (DiT, U-ViT with long skips, a U-Net) at matched Gflops, each run for the same number
    of images with every seed of --seeds. Each run's EMA weights are sampled and scored at the end
    (FD-EffNet and, on Fashion-MNIST, class accuracy); tables and plots of quality against Gflops
    and against wall-clock follow. Resumable: run the same command again after an interruption."""

    out: str = field(default="study", metadata=option("study folder: runs, results.csv/json, table.md and plots"))
    recipe: str = field(default="fmnist-fast", metadata=option("training recipe every run takes (a recipe name or a TOML file of ditkit train settings); the study sets the model, seed and budget"))
    images: int = field(default=80_000, metadata=positive("training images of every run (steps = images / the recipe's batch)"))
    seeds: tuple[int, ...] = field(default=(0, 1), metadata=option("seeds: every run is trained once per seed (the spread of a rerun)", ge=0))
    grids: tuple[str, ...] = field(default=STUDY_GRIDS, metadata=option(f"which comparisons to run: {', '.join(STUDY_GRIDS)}", choices=STUDY_GRIDS))
    models: tuple[str, ...] = field(default=("XS/8", "XS/4", "XS/2", "XS/1", "S/8", "S/4", "S/2", "B/8", "B/4"),
                                    metadata=option(f"the DiT size x patch grid (sizes {', '.join(f'{k} = {w} wide x {d} blocks' for k, (w, d, _) in STUDY_SIZES.items())})", choices=STUDY_MODELS))
    block_model: str = field(default="S/4", metadata=option("the DiT the four conditioning blocks are compared at", choices=STUDY_MODELS))
    blocks: tuple[str, ...] = field(default=BLOCKS, metadata=option(f"block designs compared at --block-model (Figure 5): {', '.join(BLOCKS)}", choices=BLOCKS + tuple(BLOCK_ALIASES)))
    levels: tuple[str, ...] = field(default=("B/8", "L/8", "B/4"), metadata=option("the DiTs whose Gflops set the backbones' compute levels; a U-ViT and a U-Net are sized to each", choices=STUDY_MODELS))
    family_lr: tuple[str, ...] = field(default=(), metadata=option(f"learning rate of one family's runs over the recipe's, as FAMILY=LR ({', '.join(STUDY_FAMILIES)}), e.g. uvit=1e-2: families learn best at different rates, and a fair comparison tunes each"))
    num_eval_samples: int = field(default=2000, metadata=option("samples scored per run; FD-EffNet's covariance is full rank above 1280 (fewer: biased up, comparable only at equal N)", ge=2))
    sampler: str | None = field(default=None, metadata=option("sampler of the evaluation samples (default: the recipe's)", choices=SAMPLERS))
    num_sampling_steps: int | None = field(default=None, metadata=positive("sampling steps of the evaluation samples (default: the recipe's)"))
    cfg_scale: float | None = field(default=None, metadata=option("guidance scale of the evaluation samples (default: the recipe's)", ge=0))
    eval_batch_size: int = field(default=250, metadata=positive("samples per model batch when evaluating"))
    log_every: int = field(default=100, metadata=positive("log the loss (and move the progress bar) every N steps"))
    num_workers: int = field(default=0, metadata=nonnegative("data loader processes"))
    device: str = field(default="auto", metadata=option(DEVICE_HELP))
    time_runs: bool = field(default=False, metadata=option("measure each run's training images/s alone (wrap the command in flock /work/cpu.lock for the wall-clock plot) instead of training"))

    def check(self) -> None:
        object.__setattr__(self, "blocks", tuple(BLOCK_ALIASES.get(b, b) for b in self.blocks))
        if not self.seeds:
            raise ValueError("--seeds is empty; give at least one seed (two show the spread of a rerun).")
        if not any({"sizes": self.models, "blocks": self.blocks, "backbones": self.levels}[g] for g in self.grids):
            raise ValueError("the study has no runs; give --grids with --models, --blocks or --levels to fill them.")
        self.lr_of("dit")  # a malformed --family-lr fails here, in one sentence

    def lr_of(self, family: str) -> float | None:
        """The --family-lr learning rate of `family` (one of STUDY_FAMILIES), None for the recipe's."""
        rates = {}
        for item in self.family_lr:
            key, _, value = item.partition("=")
            try:
                rate = float(value)
            except ValueError:
                rate = math.nan
            if key.lower() not in STUDY_FAMILIES or not (math.isfinite(rate) and rate > 0):  # NaN and inf fail too
                raise ValueError(f"--family-lr {item!r} is not FAMILY=LR with FAMILY one of {', '.join(STUDY_FAMILIES)} and LR > 0; "
                                 "write e.g. --family-lr uvit=1e-2 dit=3e-3.")  # fmt: skip
            rates[key.lower()] = rate
        return rates.get(family)


EXPORT_FORMATS = ("diffusers", "ditkit")
# Samplers with a diffusers scheduler that DiTPipeline can run (ddpm's learned variance has none).
DIFFUSERS_SAMPLERS = ("ddim", "dpm++2m", "unipc")


@dataclass(frozen=True)
class ExportConfig(Config):
    """Convert a checkpoint. --format diffusers writes a folder that diffusers.DiTPipeline.from_pretrained
    loads (DiTTransformer2DModel, scheduler, VAE, model_index.json); --format ditkit writes ditkit's own
    folder (model.safetensors + config.json) from any checkpoint ditkit reads, a diffusers folder
    (facebook/DiT-XL-2-256's layout included) or a Hugging Face Hub id."""

    ckpt: str | None = field(default=None, metadata=option("checkpoint: official .pt, ditkit model folder or training checkpoint, diffusers folder, or Hugging Face Hub id (default: the bundled model)"))
    out: str | None = field(default=None, metadata=option("output folder; must not exist yet, or be empty"))
    format: str | None = field(default=None, metadata=option("diffusers (DiTPipeline) or ditkit (default: diffusers for the paper's diffusion DiTs, ditkit for the rest: flow models, modern designs, MMDiTs)", choices=EXPORT_FORMATS))
    vae: str | None = field(default=None, metadata=option(VAE_HELP + "; copied into the diffusers folder (latent models need one)"))
    sampler: str | None = field(default=None, metadata=option("scheduler of the diffusers folder (default: the model's sampler where it is one of these, else ddim)", choices=DIFFUSERS_SAMPLERS))
    lora: str | None = field(default=None, metadata=option("merge this LoRA adapter into the weights first (ditkit train --lora-rank, ditkit dpo); without --ckpt, onto the base it records"))

    def check(self) -> None:
        if not self.out:
            raise ValueError("--out is required; pass the folder to write (ditkit export --out my-model).")


@dataclass(frozen=True)
class EMAConfig(Config):
    """Post-hoc EMA (EDM2): the EMA of any length, reconstructed from the snapshots a run trained with
    --ema-profiles saved, written as a model folder that ditkit sample takes (one per --length)."""

    run: str | None = field(default=None, metadata=option("a run folder (RESULTS/NNN-MODEL) trained with --ema-profiles"))
    length: tuple[float, ...] = field(default=(0.1,), metadata=option("EMA lengths to make: EDM2's relative width sigma_rel (0.10: the spread of the average is a tenth of the run's length)", gt=0, lt=0.28))
    step: int | None = field(default=None, metadata=positive("the EMA as it was at this step (default: the last snapshot's), from the snapshots up to it: a less-trained model, such as an autoguidance guide"))
    out: str | None = field(default=None, metadata=option("output folder, with one --length (default: RUN/ema-LENGTH[-sSTEP])"))

    def check(self) -> None:
        if not self.run:
            raise ValueError("--run is required; pass the run folder (RESULTS/NNN-MODEL) of a ditkit train --ema-profiles run.")
        if not self.length:
            raise ValueError("--length needs at least one EMA length (sigma_rel), such as 0.1.")
        if self.out is not None and len(self.length) > 1:
            raise ValueError(f"--out names one folder but {len(self.length)} lengths were given; drop --out (each goes to RUN/ema-LENGTH) or pass one --length.")


# Text-to-image
