"""Samplers as plain functions with one signature, and classifier-free guidance as a wrapper
around the model function.

    sampler(model_fn, diffusion, x, extra_args, callback, generator, **options) -> x_0

`model_fn(x, t, **extra_args)` receives the timesteps the network was trained on (respacing is
mapped by the diffusion). Every sampler draws one `randn_like` per step in step order, from
the global RNG or from `generator`, as the official loops do, so a seed gives their samples.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from tqdm.auto import tqdm

from .diffusion import GaussianDiffusion

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _loop(step, model_fn, diffusion: GaussianDiffusion, x, extra_args, callback, generator, clip_denoised, progress):
    extra_args = extra_args or {}
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), disable=not progress, desc="sampling", leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = diffusion.p_mean_variance(model_fn(x, diffusion.model_timesteps(t), **extra_args), x, t, clip_denoised)
        x = step(diffusion, out, x, t, _randn_like(x, generator))
        if callback is not None:
            callback({"i": i, "x": x, "pred_xstart": out["pred_xstart"]})
    return x


def _nonzero(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise is added at the last step


def ddpm(model_fn, diffusion, x, extra_args=None, callback=None, generator=None, clip_denoised=False, progress=False):
    """Ancestral sampling: x_{t-1} = mean + sigma_t * z, with the learned or fixed variance."""

    def step(diffusion, out, x, t, noise):
        return out["mean"] + _nonzero(t, x) * torch.exp(0.5 * out["log_variance"]) * noise

    return _loop(step, model_fn, diffusion, x, extra_args, callback, generator, clip_denoised, progress)


def ddim(model_fn, diffusion, x, extra_args=None, callback=None, generator=None, clip_denoised=False, progress=False, eta=0.0):
    """DDIM (Song et al. 2021); eta = 0 is deterministic, eta = 1 matches DDPM's marginals."""

    def step(diffusion, out, x, t, noise):
        eps = diffusion.predict_eps_from_x0(x, t, out["pred_xstart"])
        alpha_bar = diffusion._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = diffusion._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        return mean + _nonzero(t, x) * sigma * noise

    return _loop(step, model_fn, diffusion, x, extra_args, callback, generator, clip_denoised, progress)


SAMPLERS: dict[str, Callable] = {"ddpm": ddpm, "ddim": ddim}


def cfg_model(model_fn: Callable, cfg_scale: float, cfg_channels: int | None = None) -> Callable:
    """Classifier-free guidance around `model_fn`, on a batch whose first half is conditional and
    second half null (the official `forward_with_cfg`): eps = uncond + s * (cond - uncond).

    cfg_channels=3 guides the first three output channels only, as the official code does;
    None guides every channel of the prediction (the standard form) and leaves the variance
    channels as each half predicted them. Returns `model_fn` itself when cfg_scale is 1.
    """
    if cfg_scale == 1.0:
        return model_fn

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        half = x[: len(x) // 2]
        out = model_fn(torch.cat([half, half]), t, y, **kwargs)
        k = x.shape[1] if cfg_channels is None else cfg_channels
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    return guided


def autocast_model(model: torch.nn.Module, precision: str) -> Callable:
    """The model as a function run under autocast in `precision`, returning float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]

    def fn(x, t, y, **kwargs):
        device_type = x.device.type
        ctx = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with ctx:
            return model(x, t, y, **kwargs).float()

    return fn


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0].item()
        raise ValueError(f"class id {bad} is outside [0, {num_classes}); pass class ids from 0 to {num_classes - 1}.")


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    y: torch.Tensor,
    sampler: str = "ddim",
    steps: int | str = 50,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
    clip_denoised: bool = False,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """N samples (in the model's input space) for N noises and N labels.

    With cfg_scale != 1 the conditional and null batches run together as one batch of 2N, as
    in the official sample.py, so DDPM draws the same per-step noise as it does.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if isinstance(steps, int) and steps <= 0:
        raise ValueError(f"the number of sampling steps must be positive, got {steps}.")
    if noise.shape[0] != y.shape[0]:
        raise ValueError(f"got {noise.shape[0]} noises but {y.shape[0]} labels; pass one label per noise.")
    config = getattr(model, "config", None)
    if config is not None:
        check_labels(y, config.num_classes)
        expected = (config.in_channels, config.input_size, config.input_size)
        if tuple(noise.shape[1:]) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape[1:])} per sample but the model takes {expected}.")
    spaced = diffusion.respaced(steps)
    model_fn = autocast_model(model, precision)
    x, labels = noise, y
    if cfg_scale != 1.0:
        null = torch.full_like(y, config.null_class if config is not None else model.num_classes)
        x, labels = torch.cat([noise, noise]), torch.cat([y, null])
        model_fn = cfg_model(model_fn, cfg_scale, cfg_channels)
    options = {"eta": eta} if sampler == "ddim" else {}
    was_training = model.training
    model.eval()
    try:
        out = SAMPLERS[sampler](
            model_fn, spaced, x, {"y": labels}, callback, generator, clip_denoised=clip_denoised, progress=progress, **options
        )
    finally:
        model.train(was_training)
    return out[: noise.shape[0]]
