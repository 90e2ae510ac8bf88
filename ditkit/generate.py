"""`ditkit sample`: a checkpoint (and a VAE for latent models) to a PNG grid and per-image PNGs."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import CONFIG_NAME, load_model
from .cli import option as _h
from .diffusion import GaussianDiffusion
from .models import DiT, DiTConfig
from .sampling import PRECISIONS, SAMPLERS, check_labels, sample

BUNDLED = Path(__file__).parent / "assets" / "fashion-mnist"
VAE_SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
# The official sample.py's demo classes (ImageNet): used for 1000-class models when none are given.
IMAGENET_DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
# Sampling settings of the official sample.py, used unless a flag or the model's config says otherwise.
OFFICIAL_SAMPLING = {"sampler": "ddpm", "num_sampling_steps": 250, "cfg_scale": 4.0}


@dataclass(frozen=True)
class SampleConfig:
    """Sample a DiT checkpoint to a PNG grid (the bundled Fashion-MNIST model by default)."""

    ckpt: str | None = field(default=None, metadata=_h("checkpoint: official .pt, or a ditkit model folder (default: the bundled model)"))
    model: str | None = field(default=None, metadata=_h("preset such as DiT-XL/2 (default: read from the checkpoint)"))
    vae: str | None = field(default=None, metadata=_h("AutoencoderKL folder or hub id; 'ema'/'mse' = stabilityai/sd-vae-ft-*"))
    image_size: int | None = field(default=None, metadata=_h("image size in pixels (default: from the checkpoint)"))
    num_classes: int | None = field(default=None, metadata=_h("number of classes (default: from the checkpoint)"))
    classes: tuple[int, ...] = field(default=(), metadata=_h("class ids to sample, cycled over the samples (default: every class, or 8 ImageNet demo classes)"))
    num_samples: int | None = field(default=None, metadata=_h("number of samples (default: 4 per class for up to 16 classes, else one per class)"))
    cfg_scale: float | None = field(default=None, metadata=_h("classifier-free guidance scale; 1 = none (default: the model's, else 4.0)"))
    cfg_channels: int | None = field(default=None, metadata=_h("guide only the first N output channels (3 = official); default: 3 for official .pt files, else all"))
    num_sampling_steps: int | None = field(default=None, metadata=_h("number of respaced steps (default: the model's, else 250)"))
    sampler: str | None = field(default=None, metadata=_h("sampler (default: the model's, else ddpm)", choices=tuple(SAMPLERS)))
    eta: float = field(default=0.0, metadata=_h("DDIM eta"))
    seed: int = field(default=0, metadata=_h("global seed for the initial and per-step noise"))
    batch_size: int = field(default=64, metadata=_h("samples per model batch"))
    device: str = field(default="auto", metadata=_h("cpu, cuda, cuda:N, or auto"))
    precision: str = field(default="fp32", metadata=_h("model precision", choices=tuple(PRECISIONS)))
    out: str = field(default="samples", metadata=_h("output folder: grid.png and one PNG per sample"))

    def __post_init__(self):
        if self.num_sampling_steps is not None and self.num_sampling_steps <= 0:
            raise ValueError(f"--num-sampling-steps must be positive, got {self.num_sampling_steps}.")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ValueError(f"--num-samples must be positive, got {self.num_samples}.")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} was asked for but no CUDA GPU is available; use --device cpu.")
    return device


def load_vae(name: str, device: torch.device):
    """diffusers' AutoencoderKL from a local folder or (when online) a hub id."""
    from diffusers import AutoencoderKL

    repo = VAE_SHORTHANDS.get(name, name)
    try:
        vae = AutoencoderKL.from_pretrained(repo)
    except Exception as e:
        where = "folder" if Path(repo).exists() else "hub id"
        raise ValueError(
            f"cannot load the VAE from {where} {repo!r} ({type(e).__name__}); pass --vae with a local "
            "AutoencoderKL folder (config.json + weights) or a hub id while online."
        ) from None
    return vae.to(device).eval()


def vae_factor(vae) -> int:
    """Pixels per latent cell: one halving per encoder block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents (scaled as in training) -> images in [-1, 1]."""
    return vae.decode(z / vae.config.scaling_factor).sample


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounded as the official sample_ddp.py."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def save_grid(images: np.ndarray, path: str | Path, ncol: int, pad: int = 2) -> None:
    """(N, H, W, C) uint8 -> one PNG grid with `ncol` columns."""
    n, h, w, c = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def saved_sampling_defaults(ckpt: str | None) -> dict:
    """The "sampling" entry of a ditkit model's config.json (e.g. the bundled model's settings)."""
    if ckpt is None:
        return {}
    path = Path(ckpt)
    config_file = path / CONFIG_NAME if path.is_dir() else path.with_name(CONFIG_NAME)
    if path.suffix in ("", ".safetensors") and config_file.exists():
        return json.loads(config_file.read_text()).get("sampling", {})
    return {}


@dataclass(frozen=True)
class Generator:
    """A loaded model with everything needed to turn labels into images."""

    model: DiT
    vae: object | None
    device: torch.device
    sampler: str
    steps: int
    cfg_scale: float
    cfg_channels: int | None
    eta: float
    precision: str

    @property
    def config(self) -> DiTConfig:
        return self.model.config

    def images(self, y: torch.Tensor, noise: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Images in [-1, 1] for labels y; noise from the global RNG unless given."""
        c = self.config
        if noise is None:
            noise = torch.randn(len(y), c.in_channels, c.input_size, c.input_size, device=self.device)
        z = sample(self.model, GaussianDiffusion(learn_sigma=c.learn_sigma), noise, y.to(self.device),
                   sampler=self.sampler, steps=self.steps, cfg_scale=self.cfg_scale, cfg_channels=self.cfg_channels,
                   eta=self.eta, precision=self.precision, progress=progress,
                   clip_denoised=self.vae is None)  # fmt: skip  # pixels live in [-1, 1] (ADM clips too)
        return decode(self.vae, z) if self.vae is not None else z


def load_generator(cfg) -> Generator:
    """Model + VAE + sampling settings from any config with the SampleConfig fields."""
    device = resolve_device(cfg.device)
    ckpt = cfg.ckpt
    if ckpt is None:
        if not (BUNDLED / "model.safetensors").exists():
            raise FileNotFoundError(f"this install has no bundled model at {BUNDLED}; pass --ckpt with a checkpoint.")
        ckpt = str(BUNDLED)
    official = Path(ckpt).suffix == ".pt"
    defaults = {**OFFICIAL_SAMPLING, **saved_sampling_defaults(ckpt)}

    vae = load_vae(cfg.vae, device) if cfg.vae else None
    factor = vae_factor(vae) if vae is not None else 1
    if cfg.image_size is not None and cfg.image_size % factor:
        raise ValueError(f"image size {cfg.image_size} is not divisible by the VAE's downsampling factor {factor}; use a multiple of {factor}.")
    requested = None
    if cfg.model is not None:  # otherwise the checkpoint decides; --image-size etc. are checked below
        from .checkpoints import infer_config, read_checkpoint

        state, saved = read_checkpoint(ckpt)
        base = saved or infer_config(state) or DiTConfig()
        overrides = dict(
            input_size=cfg.image_size // factor if cfg.image_size is not None else base.input_size,
            num_classes=cfg.num_classes if cfg.num_classes is not None else base.num_classes,
            in_channels=base.in_channels, learn_sigma=base.learn_sigma, block=base.block,
        )  # fmt: skip
        requested = DiTConfig.from_preset(cfg.model, **overrides)
    model = load_model(ckpt, requested).to(device)
    c = model.config
    if c.in_channels not in (1, 3) and vae is None:
        raise ValueError(f"this is a latent model ({c.in_channels} channels); pass --vae with an AutoencoderKL folder or hub id.")
    if vae is not None:
        if vae.config.latent_channels != c.in_channels:
            raise ValueError(f"the VAE makes {vae.config.latent_channels}-channel latents but the model takes {c.in_channels}; pass the VAE the model was trained with.")
        if cfg.image_size is not None and cfg.image_size != c.input_size * factor:
            raise ValueError(f"image size {cfg.image_size} needs a latent of {cfg.image_size // factor} but the model takes {c.input_size}; use --image-size {c.input_size * factor}.")
    elif cfg.image_size is not None and cfg.image_size != c.input_size:
        raise ValueError(f"this pixel-space model makes {c.input_size}px images, not {cfg.image_size}px; use --image-size {c.input_size}.")
    if cfg.num_classes is not None and cfg.num_classes != c.num_classes:
        raise ValueError(f"the checkpoint has {c.num_classes} classes, not {cfg.num_classes}; use --num-classes {c.num_classes}.")
    if cfg.cfg_channels is not None and cfg.cfg_channels <= 0:
        raise ValueError(f"--cfg-channels must be positive, got {cfg.cfg_channels}.")
    cfg_channels = cfg.cfg_channels if cfg.cfg_channels is not None else (3 if official else None)
    steps = cfg.num_sampling_steps or defaults["num_sampling_steps"]
    return Generator(
        model=model, vae=vae, device=device, sampler=cfg.sampler or defaults["sampler"], steps=steps,
        cfg_scale=cfg.cfg_scale if cfg.cfg_scale is not None else defaults["cfg_scale"],
        cfg_channels=cfg_channels, eta=cfg.eta, precision=cfg.precision,
    )  # fmt: skip


def run_sample(cfg: SampleConfig) -> Path:
    torch.backends.cuda.matmul.allow_tf32 = True  # as the official sample.py
    torch.backends.cudnn.allow_tf32 = True
    gen = load_generator(cfg)
    c = gen.config
    classes = cfg.classes or (tuple(range(c.num_classes)) if c.num_classes <= 16 else IMAGENET_DEMO_CLASSES)
    check_labels(torch.tensor(classes), c.num_classes)
    n = cfg.num_samples or (4 * len(classes) if len(classes) <= 16 else len(classes))
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chunks = []
    for i in range(0, n, cfg.batch_size):
        chunks.append(to_uint8(gen.images(labels[i : i + cfg.batch_size], progress=True)))
        print(f"sampled {min(i + cfg.batch_size, n)}/{n} ({time.perf_counter() - start:.1f}s)", flush=True)
    images = np.concatenate(chunks)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / f"{i:06d}.png")
    ncol = len(classes) if len(classes) <= 16 else min(8, n)
    save_grid(images, out / "grid.png", ncol=ncol)
    print(f"wrote {out / 'grid.png'} and {n} images ({gen.sampler}, {gen.steps} steps, cfg {gen.cfg_scale}) "
          f"in {time.perf_counter() - start:.1f}s")  # fmt: skip
    return out / "grid.png"
