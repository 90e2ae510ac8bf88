"""Variance-preserving diffusion in continuous time, as U-ViT trains and samples it.

A VP process is x_t = alpha_t x_0 + sigma_t eps with alpha_t^2 + sigma_t^2 = 1, t in [0, 1]. What
DPM-Solver needs of it is log alpha_t, its half log-SNR lambda_t = log(alpha_t / sigma_t) and the
inverse of lambda, and the time the network sees at t. Two schedules give them:

- `LinearVPSchedule`: the continuous VP SDE (beta(t) = 0.1 + 19.9 t) of U-ViT's pixel and U-ViT-L
  latent models, whose network sees 999 t (the official ScoreModel);
- `DiscreteVPSchedule`: a discrete diffusion's betas read in continuous time, as DPM-Solver reads
  them: log alpha known at t_n = n / N (n = 1..N, n betas applied) and piecewise linear in between;
  the network sees N t - 1 + offset, i.e. ditkit's step k = n - 1 plus the model's offset (U-ViT-H: 1).

Both compute in float32 as the official solvers do, so their samples agree to round-off.
`VPDiffusion` is the objective "vp": U-ViT's continuous training (uniform t, eps MSE).
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import ObjectiveConfig
from .common import expand_to, mean_flat

VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0  # beta(t) = beta_min + t (beta_max - beta_min), U-ViT's sde.VPSDE
VP_TIME_SCALE = 999  # the continuous models see 999 t (U-ViT's sde.ScoreModel)


class VPSchedule:
    """alpha, sigma, lambda and its inverse from `log_alpha`; t runs from `t_end` (data) to 1 (noise)."""

    t_end: float

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1 - torch.exp(2 * self.log_alpha(t)))

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(1 - torch.exp(2 * la))


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through the knots (xp increasing), the end segments extended beyond them."""
    i = torch.clamp(torch.searchsorted(xp, x.contiguous()) - 1, 0, len(xp) - 2)
    return fp[i] + (x - xp[i]) * (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i])


class DiscreteVPSchedule(VPSchedule):
    def __init__(self, betas: np.ndarray, time_offset: int = 0):
        n = len(betas)
        self.num_timesteps, self.time_offset, self.t_end = n, time_offset, 1 / n
        self.log_alphas = 0.5 * torch.log(1 - torch.as_tensor(betas).float()).cumsum(0)  # (N,): at t_n = n / N
        self.knots = torch.linspace(1 / n, 1, n)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return interpolate(t.reshape(-1), self.knots.to(t.device), self.log_alphas.to(t.device)).reshape(t.shape)

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        xp, fp = self.log_alphas.flip(0).to(lam.device), self.knots.flip(0).to(lam.device)
        return interpolate(log_alpha.reshape(-1), xp, fp).reshape(lam.shape)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_timesteps + (self.time_offset - 1)  # offset 1 adds an exact 0: the official 1000 t


class LinearVPSchedule(VPSchedule):
    t_end = 1e-3  # the SDE's own end (U-ViT's Euler-Maruyama); its DPM-Solver runs to 1e-4

    def __init__(self, beta_min: float = VP_BETA_MIN, beta_max: float = VP_BETA_MAX):
        self.b0, self.b1 = beta_min, beta_max

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.b1 - self.b0) - 0.5 * t * self.b0

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        tmp = 2 * (self.b1 - self.b0) * torch.logaddexp(-2 * lam, torch.zeros_like(lam))
        return tmp / (torch.sqrt(self.b0**2 + tmp) + self.b0) / (self.b1 - self.b0)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.b0 + t * (self.b1 - self.b0)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * VP_TIME_SCALE


class VPDiffusion:
    """U-ViT's continuous VP SDE as an objective: t ~ U(0, 1), x_t = alpha_t x0 + sigma_t eps, the
    network predicts eps from (x_t, 999 t). A network with variance channels has them ignored."""

    name = "vp"

    def __init__(self):
        self.schedule = LinearVPSchedule()

    def __repr__(self) -> str:
        return "VPDiffusion(beta 0.1..20, network time 999 t)"

    @property
    def config(self) -> ObjectiveConfig:
        return ObjectiveConfig(objective="vp")

    def draw_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device)

    def unit_time(self, t_model: torch.Tensor) -> torch.Tensor:
        """The network's time on ditkit's common [0, 1] scale (0 = noise, 1 = data)."""
        return 1 - t_model.float() / VP_TIME_SCALE

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, **model_kwargs):
        """{"loss", "mse"}, each (N,): the eps MSE averaged over C, H, W (U-ViT's LSimple)."""
        noise = torch.randn_like(x0) if noise is None else noise
        s = self.schedule
        x_t = expand_to(s.alpha(t), x0) * x0 + expand_to(s.sigma(t), x0) * noise
        out = model(x_t, s.model_time(t), **model_kwargs)[:, : x0.shape[1]]
        mse = mean_flat((noise - out) ** 2)
        return {"loss": mse, "mse": mse}
