"""The parts a Trainer is assembled from, each usable alone: the VAE, the data's shape, the networks
(model and EMA), the optimizer, the data loader and the run folder."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoints import load_state_strict
from ..config import TrainConfig, flag
from ..lora import add_lora
from ..models import LabelEmbedder
from ..parallel import Dist, broadcast_object
from ..utils.devices import check_model_fits, loader_workers
from ..utils.runs import create_run_dir, is_run_checkpoint
from ..utils.vae import load_vae, vae_factor
from .schedule import ResumableSampler


def build_vae(cfg: TrainConfig, device: torch.device):
    """The frozen AutoencoderKL of --vae (images are encoded every step), or None for pixels and stores."""
    return load_vae(cfg.vae, device).requires_grad_(False) if cfg.vae is not None else None


def data_shape(dataset, vae, cfg: TrainConfig) -> tuple[int, int, int]:
    """(classes, input size, input channels) of what the network sees: the data's, or its latents'."""
    if len(dataset) < cfg.global_batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than the global batch {cfg.global_batch_size}; use a smaller --global-batch-size.")
    num_classes = cfg.num_classes or dataset.num_classes
    if num_classes < dataset.num_classes:
        raise ValueError(f"the data has {dataset.num_classes} classes but --num-classes is {num_classes}; raise it or leave it unset.")
    in_channels, input_size = dataset.channels, dataset.image_size
    if vae is not None:
        if getattr(dataset, "vae", None):
            raise ValueError(f"{cfg.data_path} already holds latents; drop --vae.")
        factor = vae_factor(vae)
        if input_size % factor:
            raise ValueError(f"image size {input_size} is not divisible by the VAE's factor {factor}; use a multiple of {factor}.")
        in_channels, input_size = vae.config.latent_channels, input_size // factor
    return num_classes, input_size, in_channels


def check_network_size(config, cfg: TrainConfig, device: torch.device, local_batch: int) -> None:
    """One sentence naming the flag when the network these settings make cannot be held by `device`."""
    names = {f: f"{flag(f)} {getattr(cfg, f)}" for f in ("depth", "hidden_size", "patch_size", "num_classes") if getattr(cfg, f) is not None}
    size = f"--image-size {cfg.image_size}" if cfg.image_size else f"the data's image size ({cfg.data_path})"
    uvit = {"embed_dim": names.get("hidden_size"), "img_size": size}  # a U-ViT's names of the same flags
    check_model_fits(config, device, local_batch, names={**names, "input_size": size, **{k: v for k, v in uvit.items() if v}})


def build_network(build, config, cfg: TrainConfig, base=None, base_name: str | None = None) -> nn.Module:
    """A fresh network from `build(config)`; with --init-from, the base's weights, and with
    --lora-rank a LoRA on them. Label dropout is drawn by the trainer per global batch, so the
    embedder keeps its null row but drops nothing itself."""
    model = build(config)
    if base is not None:
        load_state_strict(model, base.state, source=f"--init-from {base.path}")
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, base=base_name)
    for m in model.modules():
        if isinstance(m, LabelEmbedder):
            m.dropout_prob = 0.0
    return model


def build_ema(model: nn.Module, build) -> nn.Module:
    """The EMA copy of `model`, frozen, in eval mode, starting at the model's weights."""
    ema = build().to(next(model.parameters()).device).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    return ema


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over what trains. A full run hands it every parameter, frozen pos_embed included, as
    saved optimizer states expect; a LoRA run only the adapter's."""
    trained = [p for p in model.parameters() if p.requires_grad] if cfg.lora_rank else model.parameters()
    return torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda" or None)  # fmt: skip


def build_loader(dataset, d: Dist, cfg: TrainConfig, local_batch: int) -> tuple[DataLoader, ResumableSampler]:
    sampler = ResumableSampler(len(dataset), d.rank, d.world, cfg.global_seed, local_batch)
    workers = loader_workers(cfg.num_workers)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=workers,
                        pin_memory=d.device.type == "cuda", drop_last=True, persistent_workers=False,
                        prefetch_factor=4 if workers else None)  # fmt: skip
    return loader, sampler


def build_run_dir(cfg: TrainConfig, d: Dist, name: str, resume_from: Path | None) -> Path:
    """The run folder: the one that owns the checkpoint resumed from, else a new RESULTS_DIR/NNN-name."""
    if resume_from is not None and is_run_checkpoint(resume_from):
        return resume_from.parent.parent
    path = None
    if d.main:
        path = create_run_dir(Path(cfg.results_dir), name)
        if resume_from is not None:
            print(f"{resume_from} is not in a ditkit run folder (NNN-MODEL/checkpoints/), so the run continues in a new one: {path}", flush=True)
    return Path(broadcast_object(str(path) if path else None, d))


def total_steps(cfg: TrainConfig, per_epoch: int) -> float:
    """The run's last step: --max-steps or the epochs, whichever comes first (inf with neither bound)."""
    return min(cfg.max_steps or math.inf, cfg.epochs * per_epoch)
