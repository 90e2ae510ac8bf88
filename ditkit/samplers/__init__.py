"""Samplers as plain functions with one signature, over what an objective makes of the network:

    sampler(model_fn, objective, x, steps, extra_args, callback, generator, progress, **options) -> x

`model_fn(x, t, **extra_args)` is the network (guided, in its precision) called with the network's
own time: the diffusion's integer timesteps, or the flow's t * time_scale. Each sampler belongs to
one objective (`config.SAMPLER_OBJECTIVE`); `sample` checks the pair and does the rest.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import SAMPLER_OBJECTIVE, MMDiTConfig, samplers_for
from ..models.mmdit import TextCondition
from ..objectives import objective_name
from .flow import dopri5, euler, heun, heun2, sde_euler, sde_heun
from .gaussian import ddim, ddpm, dpmpp_2m, unipc
from .guidance import autocast_model, cfg_model, embedded_cfg_model
from .meanflow import meanflow

SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm, "ddim": ddim, "dpm++2m": dpmpp_2m, "unipc": unipc,
    "euler": euler, "heun": heun, "heun2": heun2, "dopri5": dopri5, "sde-euler": sde_euler, "sde-heun": sde_heun,
    "meanflow": meanflow,
}  # fmt: skip
assert set(SAMPLERS) == set(SAMPLER_OBJECTIVE)
DEFAULT_SAMPLER = {"gaussian": "ddim", "flow": "euler", "meanflow": "meanflow"}

__all__ = ["SAMPLERS", "sample", "cfg_model", "autocast_model", "check_labels", "check_condition", "check_sampler", "check_embedded_guidance"]


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0].item()
        raise ValueError(f"class id {bad} is outside [0, {num_classes}); pass class ids from 0 to {num_classes - 1}.")


def check_condition(y, config) -> None:
    """Class ids for a class-conditional model, a TextCondition for a text-to-image one."""
    text_model = isinstance(config, MMDiTConfig)
    if isinstance(y, torch.Tensor):
        if text_model:
            raise ValueError("this is a text-to-image model: it takes prompts (--prompt), not class ids.")
        check_labels(y, config.num_classes)
    elif not text_model:
        raise ValueError("this is a class-conditional model: it takes class ids (--classes), not prompts.")


def check_sampler(sampler: str, objective: str) -> None:
    """One sentence when a sampler does not integrate the objective it is given."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if sampler not in samplers_for(objective):
        raise ValueError(f"sampler {sampler} is for {SAMPLER_OBJECTIVE[sampler]} models, but this is a {objective} model; use one of {', '.join(samplers_for(objective))}.")


def check_guidance(cfg_scale: float, cfg_channels: int | None, cfg_interval, channels: int) -> tuple[float, float] | None:
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}.")
    if cfg_channels is not None and not 0 < cfg_channels <= channels:
        raise ValueError(f"cfg_channels must lie in 1..{channels} (the prediction's channels), got {cfg_channels}; None guides all.")
    if cfg_interval is None or len(cfg_interval) == 0:
        return None
    lo, hi = (float(v) for v in cfg_interval)
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"cfg_interval must be (lo, hi) with 0 <= lo <= hi <= 1 (t = 0 noise, 1 data), got ({lo}, {hi}).")
    return lo, hi


def check_embedded_guidance(config, cfg_scale: float, cfg_channels: int | None) -> None:
    """A model that takes the guidance scale as an input (cfg_embed) knows only the scales it was
    trained on, and guides its whole prediction."""
    lo, hi = config.cfg_range
    if not lo <= cfg_scale <= hi:
        raise ValueError(f"this model was distilled for guidance scales {lo:g} to {hi:g}, not {cfg_scale:g}; pass a --cfg-scale in that range.")
    if cfg_channels is not None:
        raise ValueError("this model takes the guidance scale as an input and guides every channel; drop cfg_channels.")


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    objective,
    noise: torch.Tensor,
    y: torch.Tensor,
    sampler: str | None = None,
    steps: int = 50,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    cfg_interval: tuple[float, float] | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
    clip_denoised: bool = False,
    progress: bool = False,
    callback: Callable | None = None,
    **options,
) -> torch.Tensor:
    """N samples (in the model's input space) for N noises and N labels (class ids, or a
    TextCondition of N prompts for a text-to-image model: its null is the empty prompt).

    `objective` is a GaussianDiffusion or a FlowMatching; `sampler` one of SAMPLERS that fits it
    (default: ddim or euler). With cfg_scale != 1 the conditional and null batches run together as
    one batch of 2N, as the official sample.py does, so DDPM draws the same per-step noise; a
    guidance-distilled model (cfg_embed) takes the scale as an input instead, in one batch of N.
    `options` go to the sampler (time_shift, atol, rtol, the SDE's diffusion_form, ...).
    """
    kind = objective_name(objective)
    sampler = sampler or DEFAULT_SAMPLER[kind]
    check_sampler(sampler, kind)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"the number of sampling steps must be a positive whole number, got {steps}.")
    if noise.shape[0] != len(y):
        what = "label" if isinstance(y, torch.Tensor) else "prompt"
        raise ValueError(f"got {noise.shape[0]} noises but {len(y)} {what}s; pass one {what} per noise.")
    interval = check_guidance(cfg_scale, cfg_channels, cfg_interval, noise.shape[1])
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}.")
    config = getattr(model, "config", None)
    if sampler == "meanflow" and config is not None and getattr(config, "time_inputs", 1) != 2:
        raise ValueError("the meanflow sampler needs a network that takes the interval (t, r), and this one takes one time; train it with --objective meanflow, or sample it with euler or heun.")
    if config is not None:
        check_condition(y, config)
        expected = (config.in_channels, config.input_size, config.input_size)
        if tuple(noise.shape[1:]) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape[1:])} per sample but the model takes {expected}.")
    model_fn = autocast_model(model, precision)
    x, labels = noise, y
    if getattr(config, "cfg_embed", False):  # guidance-distilled: the scale is an input, one pass of N
        check_embedded_guidance(config, cfg_scale, cfg_channels)
        model_fn = embedded_cfg_model(model_fn, cfg_scale, interval, objective.unit_time)
    elif cfg_scale != 1.0:
        x = torch.cat([noise, noise])
        if isinstance(y, TextCondition):
            labels = TextCondition.cat([y, y.null()])
        else:
            labels = torch.cat([y, torch.full_like(y, config.null_class if config is not None else model.num_classes)])
        model_fn = cfg_model(model_fn, cfg_scale, cfg_channels, interval, objective.unit_time)
    if sampler == "ddim":
        options["eta"] = eta
    if kind == "gaussian":
        options["clip_denoised"] = clip_denoised
    was_training = model.training
    model.eval()
    try:
        out = SAMPLERS[sampler](model_fn, objective, x, steps, {"y": labels}, callback, generator, progress, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ValueError(f"sampler {sampler} does not take {str(e).split('argument')[-1].strip()}; drop that option.") from None
        raise
    finally:
        model.train(was_training)
    out = out[: noise.shape[0]]
    if kind != "gaussian" and clip_denoised:
        out = out.clamp(-1, 1)
    if not torch.isfinite(out).all():
        raise FloatingPointError("sampling produced NaN or infinite values; use --precision fp32, fewer guidance, or more steps.")
    return out
