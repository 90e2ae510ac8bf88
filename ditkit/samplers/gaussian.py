"""Samplers of the Gaussian diffusion: the official DDPM and DDIM loops over respaced steps,
and DPM-Solver++(2M) and UniPC through diffusers' schedulers.

`model_fn(x, t, **extra_args)` receives the timesteps the network was trained on (respacing is
mapped by the diffusion). DDPM and DDIM draw one `randn_like` per step in step order, from the
global RNG or from `generator`, as the official loops do, so a seed gives their samples.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..objectives.gaussian import GaussianDiffusion


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _loop(step, model_fn, diffusion: GaussianDiffusion, x, extra_args, callback, generator, clip_denoised, progress):
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), disable=not progress, desc="sampling", leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = diffusion.p_mean_variance(model_fn(x, diffusion.model_timesteps(t), **extra_args), x, t, clip_denoised)
        x = step(diffusion, out, x, t, randn_like(x, generator))
        if callback is not None:
            callback({"i": i, "x": x, "pred_xstart": out["pred_xstart"]})
    return x


def _nonzero(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise is added at the last step


def ddpm(model_fn, diffusion: GaussianDiffusion, x, steps, extra_args=None, callback=None, generator=None, progress=False,
         clip_denoised=False):  # fmt: skip
    """Ancestral sampling: x_{t-1} = mean + sigma_t * z, with the learned or fixed variance."""

    def step(diffusion, out, x, t, noise):
        return out["mean"] + _nonzero(t, x) * torch.exp(0.5 * out["log_variance"]) * noise

    return _loop(step, model_fn, diffusion.respaced(steps), x, extra_args or {}, callback, generator, clip_denoised, progress)


def ddim(model_fn, diffusion: GaussianDiffusion, x, steps, extra_args=None, callback=None, generator=None, progress=False,
         clip_denoised=False, eta=0.0):  # fmt: skip
    """DDIM (Song et al. 2021); eta = 0 is deterministic, eta = 1 matches DDPM's marginals."""

    def step(diffusion, out, x, t, noise):
        eps = diffusion.predict_eps_from_x0(x, t, out["pred_xstart"])
        alpha_bar = diffusion._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = diffusion._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        return mean + _nonzero(t, x) * sigma * noise

    return _loop(step, model_fn, diffusion.respaced(steps), x, extra_args or {}, callback, generator, clip_denoised, progress)


def _multistep(scheduler, model_fn, diffusion: GaussianDiffusion, x, steps, extra_args, callback, progress, clip_denoised):
    """Run a diffusers multistep scheduler (eps prediction, the diffusion's own betas) over `steps`
    model calls; the network's variance channels, if any, are dropped."""
    scheduler.set_timesteps(steps, device=x.device)
    C = x.shape[1]
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = model_fn(x, diffusion.model_timesteps(tt), **extra_args)[:, :C]  # the network's own time (U-ViT-H: k + 1)
        if callback is not None or clip_denoised:
            x0 = diffusion.predict_x0_from_eps(x, tt, eps)
            if clip_denoised:  # clip the x0 prediction and re-derive eps from it (pixel models live in [-1, 1])
                eps = diffusion.predict_eps_from_x0(x, tt, x0.clamp(-1, 1))
        x = scheduler.step(eps, t, x).prev_sample
        if callback is not None:
            callback({"i": len(scheduler.timesteps) - 1 - i, "x": x, "pred_xstart": x0})
    return x


def _scheduler_kwargs(diffusion: GaussianDiffusion) -> dict:
    if diffusion.timestep_map != list(range(diffusion.num_timesteps)):
        raise ValueError("DPM-Solver++ and UniPC take the full 1000-step diffusion, not a respaced one; pass GaussianDiffusion().")
    return dict(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas, prediction_type="epsilon",
                timestep_spacing="linspace", lower_order_final=True, final_sigmas_type="zero")  # fmt: skip


def multistep_scheduler(sampler: str, diffusion: GaussianDiffusion):
    """The diffusers scheduler behind dpm++2m or unipc over `diffusion`'s betas (also what `ditkit export` writes)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if sampler == "dpm++2m":
        return DPMSolverMultistepScheduler(**_scheduler_kwargs(diffusion), algorithm_type="dpmsolver++", solver_order=2)
    return UniPCMultistepScheduler(**_scheduler_kwargs(diffusion), solver_order=2, solver_type="bh2", predict_x0=True)


def dpmpp_2m(model_fn, diffusion: GaussianDiffusion, x, steps, extra_args=None, callback=None, generator=None, progress=False,
             clip_denoised=False):  # fmt: skip
    """DPM-Solver++(2M) (Lu et al. 2022), diffusers' DPMSolverMultistepScheduler: one model call per step."""
    return _multistep(multistep_scheduler("dpm++2m", diffusion), model_fn, diffusion, x, steps, extra_args or {}, callback, progress, clip_denoised)


def unipc(model_fn, diffusion: GaussianDiffusion, x, steps, extra_args=None, callback=None, generator=None, progress=False,
          clip_denoised=False):  # fmt: skip
    """UniPC (Zhao et al. 2023), bh2 with the corrector, diffusers' UniPCMultistepScheduler: one model call per step."""
    return _multistep(multistep_scheduler("unipc", diffusion), model_fn, diffusion, x, steps, extra_args or {}, callback, progress, clip_denoised)
