"""The numbers of a training step that are schedules or draws: the global batch's randomness, the
learning rate, the EMA decay, and the data order that resumes part-way through an epoch."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from ..config import EMAOptions, OptimOptions


class ResumableSampler(Sampler[int]):
    """DistributedSampler's order (shuffled by seed + epoch, padded, strided by rank) that can
    start part-way through an epoch, for exact resume."""

    def __init__(self, n: int, rank: int, world: int, seed: int, local_batch: int):
        self.n, self.rank, self.world, self.seed, self.local_batch = n, rank, world, seed, local_batch
        self.per_rank = math.ceil(n / world)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.local_batch  # drop_last

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank gets as many
        mine = order[self.rank :: self.world]
        return iter(mine[self.start_batch * self.local_batch :])

    def __len__(self) -> int:
        return self.per_rank - self.start_batch * self.local_batch


# -- the step --------------------------------------------------------------------------------
def step_randomness(seed: int, step: int, global_batch: int, shape: tuple, objective, drop_prob: float, device):
    """(t, noise, drop) for the global batch of `step`, identical on every rank; t is drawn by the
    objective (the diffusion's integer steps, the flow's times)."""
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % 2**63)
    t = objective.draw_t(global_batch, generator=g, device=device)
    noise = torch.randn((global_batch, *shape), generator=g, device=device)
    drop = torch.rand(global_batch, generator=g, device=device) < drop_prob
    return t, noise, drop


def learning_rate(cfg: OptimOptions, step: int, total: float) -> float:
    """The lr of 0-based `step`: linear warm-up, then constant or a cosine / linear decay that
    reaches min_lr at the last of `total` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or not math.isfinite(total):
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1.0, total - cfg.warmup_steps - 1))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1 - frac
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def fitted_total(step: int, elapsed: float, anchor: tuple[int, float], minutes: float, cap: float) -> float:
    """The step at which --max-minutes will stop the run, for --fit-to-minutes: `step` after `elapsed`
    seconds, at the speed since `anchor` (step, seconds: the first log step, so that compilation and
    warm-up of the first steps do not count), never past `cap` (--max-steps) nor before the next step."""
    rate = (step - anchor[0]) / max(elapsed - anchor[1], 1e-9)
    return min(cap, max(step + 1.0, step + rate * (60 * minutes - elapsed)))


def ema_decay(cfg: EMAOptions, step: int) -> float:
    """The EMA decay after 1-based optimizer step `step`."""
    if cfg.ema_schedule == "warmup":
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    if cfg.ema_schedule == "power":  # EDM2: the average over a fixed fraction of the steps so far
        return power_decay(cfg.ema_gamma, step)
    return cfg.ema_decay


def power_decay(gamma: float, step: int) -> float:
    """The decay after 1-based step `step` of EDM2's power EMA of exponent gamma."""
    return (1 - 1 / step) ** (gamma + 1)


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)
