"""Configs of the other commands: eval, extract, flops, study, export and ema."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import (
    BAD_IMAGE_ACTIONS,
    BLOCK_ALIASES,
    BLOCKS,
    DEVICE_HELP,
    FLOPS_IN_CHANNELS,
    FLOPS_IMAGE_SIZE,
    METRICS,
    MMDIT_PRESETS,
    PRESETS,
    SAMPLER_OBJECTIVE,
    SAMPLERS,
    SD_VAE_FACTOR,
    SPLITS,
    STORE_DTYPES,
    VAE_HELP,
    Config,
    nonnegative,
    option,
    positive,
)
from .models import scaled_sizes


@dataclass(frozen=True)
class EvalConfig(Config):
    """Evaluate samples against a reference set and report every metric that can be computed here,
    saying why any other is skipped: class accuracy (labelled 32x32x1 Fashion-MNIST samples, with
    the bundled classifier), FD-EffNet (offline; more samples and reference images than its 1280
    feature dimensions), and FID, sFID, Inception Score, precision and recall (ADM's definitions)
    when the FID Inception weights are available. --metrics asks for some by name: then one that
    cannot be computed is an error."""

    samples: str | None = field(default=None, metadata=option("samples .npz (arr_0 uint8 N×H×W×C, optional labels), or a dataset name such as fashion-mnist-train:10000"))
    ref: str | None = field(default=None, metadata=option("reference .npz in the same format, or fashion-mnist (its test split); not needed for --metrics accuracy"))
    metrics: tuple[str, ...] = field(default=(), metadata=option(f"metrics to report: {', '.join(METRICS)} (default: every one that can be computed)", choices=METRICS))
    inception: str | None = field(default=None, metadata=option("FID Inception weights pt_inception-2015-12-05-6726825d.pth (default: look in ~/.cache/ditkit and torch hub's checkpoints; skip FID etc. if absent)"))
    batch_size: int = field(default=64, metadata=positive("images per feature-network batch"))
    device: str = field(default="auto", metadata=option(DEVICE_HELP))
    cache_dir: str | None = field(default=None, metadata=option("where reference statistics and dataset .npz files are kept (default: $XDG_CACHE_HOME/ditkit or ~/.cache/ditkit)"))
    json: bool = field(default=False, metadata=option("print the results as JSON instead of a table"))

    def check(self) -> None:
        if not self.samples:
            raise ValueError("--samples is required; pass the .npz written by ditkit sample-npz.")
        if not self.ref and set(self.metrics) != {"accuracy"}:
            raise ValueError("--ref is required; pass a reference .npz or fashion-mnist (or ask for --metrics accuracy alone).")


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
    num_workers: int = field(default=4, metadata=nonnegative("data-loading processes per process"))
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

    model: tuple[str, ...] = field(default=(), metadata=option("presets to count (default: all 12, or none with --ckpt; MMDiT-*: the text at 77 tokens)", aliases=("--models",), choices=PRESETS + MMDIT_PRESETS))
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
    """Train a grid of DiT configs (model size x patch size, the four block designs, a U-Net
    baseline) for a fixed budget each, score each checkpoint offline (FD-EffNet and, on
    Fashion-MNIST, class accuracy) and plot the paper's scaling figures. Resumable: run the same
    command again after an interruption."""

    out: str = field(default="study", metadata=option("study folder: runs, results.csv/json and plots"))
    data_path: str = field(default="fashion-mnist", metadata=option("pixel-space data: fashion-mnist (32x32, so p = 2, 4, 8 divide), mnist, digits or an image folder"))
    models: tuple[str, ...] = field(default=("DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-B/2", "DiT-B/4", "DiT-B/8"), metadata=option("presets of the size x patch grid (adaLN-Zero blocks)", choices=PRESETS))
    blocks: tuple[str, ...] = field(default=BLOCKS, metadata=option(f"block designs compared at --block-model (Figure 5): {', '.join(BLOCKS)}", choices=BLOCKS + tuple(BLOCK_ALIASES)))
    block_model: str = field(default="DiT-S/2", metadata=option("preset the block designs are compared at (the paper: DiT-XL/2)", choices=PRESETS))
    unet: bool = field(default=True, metadata=option("also train a U-Net baseline (diffusers' UNet2DModel)"))
    unet_match: str = field(default="DiT-S/2", metadata=option("the U-Net's width is chosen so that its Gflops match this preset's (after the divisors)", choices=PRESETS))
    width_divisor: int = field(default=1, metadata=positive("divide every preset's hidden size by this (head count kept, so heads get narrower): a CPU-sized grid with the presets' ratios"))
    depth_divisor: int = field(default=1, metadata=positive("divide every preset's depth by this (rounded, at least 1 block)"))
    steps: int = field(default=5000, metadata=positive("training steps of every run: the fixed budget (raise it to extend a finished study)"))
    eval_every: int = field(default=1000, metadata=positive("checkpoint and evaluate every N steps (and at the last step)"))
    num_eval_samples: int = field(default=2000, metadata=option("samples per evaluation; FD-EffNet's covariance is full rank above 1280 (fewer: biased up, comparable only at equal N)", ge=2))
    sampler: str = field(default="ddim", metadata=option("sampler for the evaluation samples", choices=SAMPLERS))
    num_sampling_steps: int = field(default=50, metadata=positive("sampling steps for the evaluation samples"))
    cfg_scale: float = field(default=1.0, metadata=option("classifier-free guidance scale of the evaluation samples (the paper's scaling figures: 1, none)", ge=0))
    eval_batch_size: int = field(default=256, metadata=positive("samples per model batch when evaluating"))
    global_batch_size: int = field(default=256, metadata=positive("training batch size"))
    lr: float = field(default=1e-4, metadata=positive("AdamW learning rate (the paper's 1e-4)"))
    warmup_steps: int = field(default=0, metadata=nonnegative("linear learning-rate warm-up steps (the paper: none)"))
    ema_decay: float = field(default=0.999, metadata=option("EMA decay; the paper's 0.9999 averages ~10k steps and would score mostly the initial weights of short runs", ge=0, lt=1))
    seed: int = field(default=0, metadata=option("seed of every run, and of the evaluation labels and noise", ge=0))
    log_every: int = field(default=100, metadata=positive("log the loss (and move the progress bar) every N steps"))
    num_workers: int = field(default=2, metadata=nonnegative("data loader processes"))
    device: str = field(default="auto", metadata=option(DEVICE_HELP))
    precision: str = field(default="fp32", metadata=option("training precision; evaluation samples in the same", choices=("fp32", "bf16")))

    def check(self) -> None:
        object.__setattr__(self, "blocks", tuple(BLOCK_ALIASES.get(b, b) for b in self.blocks))
        if SAMPLER_OBJECTIVE[self.sampler] != "gaussian":
            raise ValueError(f"the study trains the paper's diffusion; pick a diffusion sampler ({', '.join(s for s, o in SAMPLER_OBJECTIVE.items() if o == 'gaussian')}).")
        if not (self.models or self.blocks or self.unet):
            raise ValueError("the study has no runs; give --models, --blocks or --unet.")
        for preset in {*self.models, self.block_model, self.unet_match}:
            scaled_sizes(preset, self.width_divisor, self.depth_divisor)  # raises on sizes that do not divide


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
    format: str = field(default="diffusers", metadata=option("diffusers (DiTPipeline) or ditkit", choices=EXPORT_FORMATS))
    vae: str | None = field(default=None, metadata=option(VAE_HELP + "; copied into the diffusers folder (latent models need one)"))
    sampler: str | None = field(default=None, metadata=option("scheduler of the diffusers folder (default: the model's sampler where it is one of these, else ddim)", choices=DIFFUSERS_SAMPLERS))
    lora: str | None = field(default=None, metadata=option("merge this LoRA adapter into the weights first (ditkit train --lora-rank, ditkit dpo); without --ckpt, onto the base it records"))

    def check(self) -> None:
        if not self.out:
            raise ValueError("--out is required; pass the folder to write.")


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
