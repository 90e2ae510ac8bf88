"""The samplers of U-ViT's official code, over a VP process in continuous time (objectives/vp.py):

- `dpm_solver_pp`: DPM-Solver++ (Lu et al. 2022) on the data prediction, singlestep, as U-ViT-H
  samples its discrete diffusion (`dpm_solver_pp.py`, method 'fast'): a grid of steps + 1 points
  uniform in t from 1 to 1/N, covered by third-order steps (then a second- or first-order one) that
  each span as many grid intervals as their order, evaluating the network at the grid points;
- `dpm_solver`: DPM-Solver-fast (Lu et al. 2022) on the noise prediction, as U-ViT's VP models
  sample (`dpm_solver_pytorch.py`): steps // 3 + 1 steps on a grid uniform in log-SNR, mostly third
  order with intermediate points at 1/3 and 2/3 of each step;
- `euler_maruyama` and `euler_maruyama_ode`: the reverse SDE (U-ViT's CIFAR-10 and CelebA sampler,
  one noise draw per step from the global RNG or `generator`, none at the last) and its ODE.

`steps` counts network evaluations, as the official `steps` does. Every sampler takes the eps
prediction (the first C channels of the network's output) at the network's own time.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..objectives.gaussian import GaussianDiffusion
from ..objectives.vp import LinearVPSchedule, VPDiffusion, VPSchedule
from .gaussian import randn_like

DPM_SOLVER_END = 1e-4  # where U-ViT's DPM-Solver-fast stops on the continuous VP SDE


def solver_orders(steps: int) -> list[int]:
    """The orders of the 'fast' singlestep solvers: third order, then what is left (they sum to steps)."""
    k = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    return [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])


def _eps_fn(model_fn, schedule: VPSchedule, x: torch.Tensor, extra_args: dict):
    channels = x.shape[1]

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # t: (1,)
        return model_fn(x, schedule.model_time(t).expand(x.shape[0]), **extra_args)[:, :channels]

    return eps


def dpm_solver_pp(model_fn, diffusion: GaussianDiffusion, x, steps, extra_args=None, callback=None, generator=None, progress=False,
                  clip_denoised=False):  # fmt: skip
    """DPM-Solver++ singlestep, method 'fast', on a time-uniform grid: U-ViT-H's sampler (50 steps)."""
    s_ = diffusion.vp_schedule()
    eps = _eps_fn(model_fn, s_, x, extra_args or {})
    alpha, sigma, lam = s_.alpha, s_.sigma, s_.lam

    def data(x, t):  # the data prediction D(x, t)
        d = (x - sigma(t) * eps(x, t)) / alpha(t)
        return d.clamp(-1, 1) if clip_denoised else d

    grid = torch.linspace(1.0, s_.t_end, steps + 1, device=x.device)
    i = 0
    orders = solver_orders(steps)
    for j, order in enumerate(tqdm(orders, disable=not progress, desc="sampling", leave=False)):
        s, t = grid[i : i + 1], grid[i + order : i + order + 1]
        h = lam(t) - lam(s)
        d_s = data(x, s)
        phi1 = torch.expm1(-h)
        if order == 1:
            x = sigma(t) / sigma(s) * x - alpha(t) * phi1 * d_s
        else:
            r1 = (lam(grid[i + 1 : i + 2]) - lam(s)) / h
            s1 = s_.inverse_lambda(lam(s) + r1 * h)
            u1 = sigma(s1) / sigma(s) * x - alpha(s1) * torch.expm1(-r1 * h) * d_s
            d_1 = data(u1, s1)
            if order == 2:
                x = sigma(t) / sigma(s) * x - alpha(t) * phi1 * d_s - 0.5 / r1 * alpha(t) * phi1 * (d_1 - d_s)
            else:
                r2 = (lam(grid[i + 2 : i + 3]) - lam(s)) / h
                s2 = s_.inverse_lambda(lam(s) + r2 * h)
                phi2, phi22 = phi1 / h + 1, torch.expm1(-r2 * h) / (r2 * h) + 1
                u2 = sigma(s2) / sigma(s) * x - alpha(s2) * torch.expm1(-r2 * h) * d_s + r2 / r1 * alpha(s2) * phi22 * (d_1 - d_s)
                d_2 = data(u2, s2)
                x = sigma(t) / sigma(s) * x - alpha(t) * phi1 * d_s + 1 / r2 * alpha(t) * phi2 * (d_2 - d_s)
        i += order
        if callback is not None:
            callback({"i": len(orders) - 1 - j, "x": x, "pred_xstart": d_s})
    return x


def dpm_solver(model_fn, vp: VPDiffusion, x, steps, extra_args=None, callback=None, generator=None, progress=False):
    """DPM-Solver-fast on the noise prediction over a log-SNR-uniform grid: U-ViT's VP models' sampler (50 steps)."""
    s_ = vp.schedule
    eps = _eps_fn(model_fn, s_, x, extra_args or {})
    la, sigma, lam = s_.log_alpha, s_.sigma, s_.lam
    orders = solver_orders(steps)
    ends = lam(torch.tensor(1.0)).item(), lam(torch.tensor(DPM_SOLVER_END)).item()
    grid = s_.inverse_lambda(torch.linspace(*ends, len(orders) + 1, device=x.device))
    for i, order in enumerate(tqdm(orders, disable=not progress, desc="sampling", leave=False)):
        s, t = grid[i : i + 1], grid[i + 1 : i + 2]
        h = lam(t) - lam(s)
        e_s = eps(x, s)
        decay = (la(t) - la(s)).exp()
        if order == 1:
            x = decay * x - sigma(t) * torch.expm1(h) * e_s
        elif order == 2:
            r1 = 0.5
            s1 = s_.inverse_lambda(lam(s) + r1 * h)
            u = (la(s1) - la(s)).exp() * x - sigma(s1) * torch.expm1(r1 * h) * e_s
            x = decay * x - sigma(t) * torch.expm1(h) * e_s - 0.5 / r1 * sigma(t) * torch.expm1(h) * (eps(u, s1) - e_s)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = s_.inverse_lambda(lam(s) + r1 * h), s_.inverse_lambda(lam(s) + r2 * h)
            phi22, phi2 = torch.expm1(r2 * h) / (r2 * h) - 1, torch.expm1(h) / h - 1
            u1 = (la(s1) - la(s)).exp() * x - sigma(s1) * torch.expm1(r1 * h) * e_s
            e_1 = eps(u1, s1)
            u2 = (la(s2) - la(s)).exp() * x - sigma(s2) * torch.expm1(r2 * h) * e_s - r2 / r1 * sigma(s2) * phi22 * (e_1 - e_s)
            e_2 = eps(u2, s2)
            x = decay * x - sigma(t) * torch.expm1(h) * e_s - 1 / r2 * sigma(t) * phi2 * (e_2 - e_s)
        if callback is not None:
            callback({"i": len(orders) - 1 - i, "x": x})
    return x


def _euler_maruyama(model_fn, vp: VPDiffusion, x, steps, extra_args, callback, generator, progress, noise: bool):
    s_: LinearVPSchedule = vp.schedule
    eps = _eps_fn(model_fn, s_, x, extra_args or {})
    ts = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(s_.t_end, 1, steps, dtype=torch.float64)]).float().to(x.device)
    pairs = list(zip(ts[:-1], ts[1:]))[::-1]  # (s, t), from t = 1 down to (0, t_end)
    for i, (s, t) in enumerate(tqdm(pairs, disable=not progress, desc="sampling", leave=False)):
        t1 = t.reshape(1)
        beta = s_.beta(t1)
        cum_alpha = torch.exp(-(s_.b0 * t1 + (s_.b1 - s_.b0) * t1**2 / 2))
        drift = -0.5 * beta * x + (1.0 if noise else 0.5) * beta * eps(x, t1) / torch.sqrt(1 - cum_alpha)
        dt = s - t
        x = x + drift * dt
        if noise and s != 0:  # the last step adds no noise
            x = x + torch.sqrt(beta) * torch.sqrt(-dt) * randn_like(x, generator)
        if callback is not None:
            callback({"i": len(pairs) - 1 - i, "x": x})
    return x


def euler_maruyama(model_fn, vp: VPDiffusion, x, steps, extra_args=None, callback=None, generator=None, progress=False):
    """The reverse VP SDE by Euler-Maruyama, `steps` steps from t = 1 to 0 (U-ViT's CIFAR-10 and CelebA: 1 000)."""
    return _euler_maruyama(model_fn, vp, x, steps, extra_args, callback, generator, progress, noise=True)


def euler_maruyama_ode(model_fn, vp: VPDiffusion, x, steps, extra_args=None, callback=None, generator=None, progress=False):
    """The probability-flow ODE of the VP SDE by Euler steps on the same grid (deterministic)."""
    return _euler_maruyama(model_fn, vp, x, steps, extra_args, callback, generator, progress, noise=False)
