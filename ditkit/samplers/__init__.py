"""Samplers as plain functions with one signature, over what an objective makes of the network:

    sampler(model_fn, objective, x, steps, extra_args, callback, generator, progress, **options) -> x

`model_fn(x, t, **extra_args)` is the network (guided, in its precision) called with the network's
own time: the diffusion's integer timesteps, or the flow's t * time_scale. `extra_args["y"]` is the
condition, which samplers pass on without looking at it: class ids, encoded prompts, anything the
network takes, as long as its rows slice (`y[:n]`) and it has a null for guidance (a `.null()`, or
the network's null class for label tensors). Each sampler belongs to one objective
(`config.SAMPLER_OBJECTIVE`; a MeanFlow model runs the flow ones too, `config.samplers_for`).

`sample` is the checked entry point for Python users: it validates its settings once (a `Sampling`)
and calls `run_sampling`, which the pipeline calls directly with the settings it has checked.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import SAMPLER_OBJECTIVE, Sampling, check_sampler
from ..objectives import objective_name
from .flow import dopri5, dpmpp_2m_flow, euler, heun, heun2, sde_euler, sde_heun
from .gaussian import ddim, ddpm, dpmpp_2m, unipc
from .guidance import autocast_model, autoguided_model, cfg_model, embedded_cfg_model, null_condition
from .meanflow import meanflow
from .vp import dpm_solver, dpm_solver_pp, euler_maruyama, euler_maruyama_ode

SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm, "ddim": ddim, "dpm++2m": dpmpp_2m, "unipc": unipc,
    "euler": euler, "heun": heun, "heun2": heun2, "dpm++2m-flow": dpmpp_2m_flow, "dopri5": dopri5, "sde-euler": sde_euler, "sde-heun": sde_heun,
    "dpm-solver++": dpm_solver_pp, "dpm-solver": dpm_solver, "euler-maruyama": euler_maruyama, "euler-maruyama-ode": euler_maruyama_ode,
    "meanflow": meanflow,
}  # fmt: skip
assert set(SAMPLERS) == set(SAMPLER_OBJECTIVE)
DEFAULT_SAMPLER = {"gaussian": "ddim", "flow": "euler", "vp": "dpm-solver", "meanflow": "meanflow"}

__all__ = ["SAMPLERS", "sample", "run_sampling", "cfg_model", "autoguided_model", "autocast_model", "check_labels", "check_condition",
           "check_embedded_guidance", "check_guide"]  # fmt: skip


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0].item()
        raise ValueError(f"class id {bad} is outside [0, {num_classes}); pass class ids from 0 to {num_classes - 1}.")


def check_condition(y, config) -> None:
    """Class ids for a class-conditional network, prompts for a text-to-image one (config.conditioning)."""
    if getattr(config, "conditioning", "class") == "text":
        if isinstance(y, torch.Tensor):
            raise ValueError(f"this is a {config.kind} model: it takes prompts (--prompt), not class ids.")
    elif not isinstance(y, torch.Tensor):
        raise ValueError("this is a class-conditional model: it takes class ids (--classes), not prompts.")
    else:
        check_labels(y, config.num_real_classes if hasattr(config, "num_real_classes") else config.num_classes)


def check_embedded_guidance(config, cfg_scale: float, cfg_channels: int | None) -> None:
    """A model that takes the guidance scale as an input (cfg_embed) knows only the scales it was
    trained on, and guides its whole prediction."""
    lo, hi = config.cfg_range
    if not lo <= cfg_scale <= hi:
        raise ValueError(f"this model was distilled for guidance scales {lo:g} to {hi:g}, not {cfg_scale:g}; pass a --cfg-scale in that range.")
    if cfg_channels is not None:
        raise ValueError("this model takes the guidance scale as an input and guides every channel; drop cfg_channels.")


def check_guide(config, guide_config) -> None:
    """An autoguidance guide must take what the model takes and predict in the same space: the same
    kind of condition (the same classes, or prompts of the same encoder width) and input shape."""
    if config is None or guide_config is None:
        return
    if getattr(config, "cfg_embed", False):
        raise ValueError("this model takes the guidance scale as an input (guidance-distilled) and needs no guide; drop the guide.")
    kind, guide_kind = getattr(config, "conditioning", "class"), getattr(guide_config, "conditioning", "class")
    if kind != guide_kind:
        raise ValueError(f"the guide is a {guide_kind}-conditional model but this one is {kind}-conditional; guide with a weaker model of the same kind and data.")
    pairs = [("input channels", "in_channels"), ("input size", "input_size")]
    pairs += [("text width", "context_dim"), ("pooled text width", "pooled_dim")] if kind == "text" else [("classes", "num_classes")]
    for what, name in pairs:
        if getattr(config, name) != getattr(guide_config, name):
            raise ValueError(f"the guide has {getattr(guide_config, name)} {what} but the model has {getattr(config, name)}; "
                             "guide with a weaker model trained on the same data and conditioning.")  # fmt: skip


def check_setup(model: torch.nn.Module, objective, sampling: Sampling, channels: int) -> None:
    """The checks of a network, an objective and sampling settings that go together: the sampler
    integrates the objective, guidance fits the prediction's channels and a guidance-distilled
    network's scales. Run once, by `sample` or where a pipeline is built."""
    check_sampler(sampling.sampler, objective_name(objective))
    if sampling.apg_eta is not None and not hasattr(objective, "data_prediction"):
        raise ValueError(f"APG (apg_eta) is implemented for flow models, not {objective_name(objective)} ones; drop it.")
    if sampling.cfg_channels is not None and sampling.cfg_channels > channels:
        raise ValueError(f"cfg_channels must lie in 1..{channels} (the prediction's channels), got {sampling.cfg_channels}; None guides all.")
    config = getattr(model, "config", None)
    if sampling.sampler == "meanflow" and config is not None and getattr(config, "time_inputs", 1) != 2:
        raise ValueError("the meanflow sampler needs a network that takes the interval (t, r), and this one takes one time; train it with --objective meanflow, or sample it with euler or heun.")
    if getattr(config, "cfg_embed", False):
        check_embedded_guidance(config, sampling.cfg_scale, sampling.cfg_channels)
    elif sampling.cfg_scale != 1.0 and getattr(config, "conditioning", "class") == "class" and getattr(config, "null_class", 0) is None:
        raise ValueError("this model was trained without label dropout, so it has no null class to guide with; use --cfg-scale 1.")


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    objective,
    noise: torch.Tensor,
    y,
    sampler: str | None = None,
    steps: int = 50,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    cfg_interval: tuple[float, float] | None = None,
    apg_eta: float | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
    clip_denoised: bool = False,
    progress: bool = False,
    callback: Callable | None = None,
    guide: torch.nn.Module | None = None,
    **options,
) -> torch.Tensor:
    """N samples (in the model's input space) for N noises and N labels (class ids, or a
    TextCondition of N prompts for a text-to-image model: its null is the empty prompt).

    `objective` is a GaussianDiffusion, a FlowMatching (or MeanFlow) or a VPDiffusion; `sampler` one of
    SAMPLERS that fits it (default: ddim, euler, meanflow or dpm-solver). With cfg_scale != 1 the conditional and null batches run together as
    one batch of 2N, as the official sample.py does, so DDPM draws the same per-step noise; a
    guidance-distilled model (cfg_embed) takes the scale as an input instead, in one batch of N.
    With a `guide` (a weaker model of the same data and objective), guidance is autoguidance: the
    guide's conditional prediction takes the place of the unconditional one, in batches of N.
    `options` go to the sampler (time_shift, atol, rtol, the SDE's diffusion_form, ...).
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"the number of sampling steps must be a positive whole number, got {steps}.")
    s = Sampling(sampler=sampler or DEFAULT_SAMPLER[objective_name(objective)], steps=steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                 cfg_interval=cfg_interval, eta=eta, precision=precision, apg_eta=apg_eta)  # fmt: skip
    check_setup(model, objective, s, noise.shape[1])
    config = getattr(model, "config", None)
    if config is not None:
        check_condition(y, config)
    if guide is not None:
        check_guide(config, getattr(guide, "config", None))
    return run_sampling(model, objective, noise, y, s, generator=generator, clip_denoised=clip_denoised, progress=progress,
                        callback=callback, guide=guide, **options)  # fmt: skip


@torch.no_grad()
def run_sampling(model: torch.nn.Module, objective, noise: torch.Tensor, y, s: Sampling, generator: torch.Generator | None = None,
                 clip_denoised: bool = False, progress: bool = False, callback: Callable | None = None,
                 guide: torch.nn.Module | None = None, **options) -> torch.Tensor:  # fmt: skip
    """`sample` with settings already checked (`check_setup`, `check_guide`): what a pipeline runs."""
    if noise.shape[0] != len(y):
        what = "label" if isinstance(y, torch.Tensor) else "prompt"
        raise ValueError(f"got {noise.shape[0]} noises but {len(y)} {what}s; pass one {what} per noise.")
    config = getattr(model, "config", None)
    if config is not None:
        expected = config.sample_shape
        if tuple(noise.shape[1:]) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape[1:])} per sample but the model takes {expected}.")
    kind = objective_name(objective)
    model_fn = autocast_model(model, s.precision)
    x, labels = noise, y
    if getattr(config, "cfg_embed", False):  # guidance-distilled: the scale is an input, one pass of N
        model_fn = embedded_cfg_model(model_fn, s.cfg_scale, s.cfg_interval, objective.unit_time)
    elif guide is not None:  # autoguidance: the guide's conditional prediction in place of the null one
        model_fn = autoguided_model(model_fn, autocast_model(guide, s.precision), s.cfg_scale, s.cfg_channels, s.cfg_interval, objective.unit_time,
                                    s.apg_eta, getattr(objective, "data_prediction", None))  # fmt: skip
    elif s.cfg_scale != 1.0:
        x = torch.cat([noise, noise])
        null = null_condition(y, config if config is not None else model)
        labels = torch.cat([y, null]) if isinstance(y, torch.Tensor) else type(y).cat([y, null])
        model_fn = cfg_model(model_fn, s.cfg_scale, s.cfg_channels, s.cfg_interval, objective.unit_time, s.apg_eta,
                             getattr(objective, "data_prediction", None))  # fmt: skip
    if s.sampler == "ddim":
        options["eta"] = s.eta
    if kind == "gaussian":
        options["clip_denoised"] = clip_denoised
    if kind in ("flow", "meanflow") and s.time_shift is not None:
        options.setdefault("time_shift", s.time_shift)
    networks = [m for m in (model, guide) if m is not None]
    was_training = [m.training for m in networks]
    for m in networks:
        m.eval()
    try:
        out = SAMPLERS[s.sampler](model_fn, objective, x, s.steps, {"y": labels}, callback, generator, progress, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ValueError(f"sampler {s.sampler} does not take {str(e).split('argument')[-1].strip()}; drop that option.") from None
        raise
    finally:
        for m, mode in zip(networks, was_training):
            m.train(mode)
    out = out[: noise.shape[0]]
    if kind != "gaussian" and clip_denoised:
        out = out.clamp(-1, 1)
    if not torch.isfinite(out).all():
        raise FloatingPointError("sampling produced NaN or infinite values; use --precision fp32, fewer guidance, or more steps.")
    return out
