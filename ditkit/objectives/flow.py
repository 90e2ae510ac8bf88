"""Flow matching: SiT's stochastic interpolants (Ma et al. 2024) and rectified flow (SD3).

Conventions are SiT's: t in [0, 1], t = 0 is noise and t = 1 is data, and
    x_t = alpha_t * data + sigma_t * noise,   u_t = d(alpha_t)/dt * data + d(sigma_t)/dt * noise,
with alpha = t, sigma = 1 - t on the linear path and alpha = sin(pi t / 2), sigma = cos(pi t / 2)
on the GVP path. The network predicts the velocity u_t and sees t * time_scale (SiT: t as is); a
learn_sigma network gives its velocity in its first C output channels.

Beyond SiT, for ditkit's own models: logit-normal training times (SD3), the SD3 time shift
t -> t / (t + s (1 - t)) (s > 1 spends more of training and sampling near noise), a time
scale for the timestep embedder, and x-prediction (JiT, Li & He 2025): the network outputs the
clean image x, whose implied velocity u = d_alpha x + d_sigma (x_t - alpha x) / sigma (on the
linear path (x - x_t) / (1 - t)) takes the velocity loss and is what the samplers integrate;
sigma is held above X_PRED_MIN_SIGMA, where the division would blow up near the data.
"""

from __future__ import annotations

import math

import torch

from ..config import FLOW_PATHS, T_SAMPLINGS, ObjectiveConfig
from .common import expand_to, mean_flat

X_PRED_MIN_SIGMA = 0.05  # JiT's clip of 1 - t in the velocity an x-prediction implies


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift in SiT's time: the noise level 1 - t becomes s(1 - t) / (1 + (s - 1)(1 - t))."""
    return t if shift == 1.0 else t / (t + shift * (1 - t))


class FlowMatching:
    """The interpolant objective: `interpolate`, `training_losses`, and the velocity the flow
    samplers integrate from t = 0 (noise) to t = 1 (data)."""

    name = "flow"

    def __init__(self, path: str = "linear", prediction: str = "velocity", t_sampling: str = "uniform",
                 t_mean: float = 0.0, t_std: float = 1.0, time_shift: float = 1.0, time_scale: float = 1.0,
                 cos_loss: float = 0.0):  # fmt: skip
        self.config = ObjectiveConfig(objective="flow", path=path, t_sampling=t_sampling, t_mean=t_mean, t_std=t_std,
                                      time_shift=time_shift, time_scale=time_scale, cos_loss=cos_loss, prediction=prediction)  # fmt: skip
        self.path, self.prediction = path, prediction
        self.t_sampling, self.t_mean, self.t_std = t_sampling, t_mean, t_std
        self.time_shift, self.time_scale, self.cos_loss = time_shift, time_scale, cos_loss
        assert path in FLOW_PATHS and t_sampling in T_SAMPLINGS

    @classmethod
    def from_config(cls, c: ObjectiveConfig) -> "FlowMatching":
        return cls(path=c.path, t_sampling=c.t_sampling, t_mean=c.t_mean, t_std=c.t_std, time_shift=c.time_shift,
                   time_scale=c.time_scale, cos_loss=c.cos_loss, prediction=c.prediction)  # fmt: skip

    def __repr__(self) -> str:
        return f"FlowMatching({', '.join(f'{k}={v!r}' for k, v in self.config.to_dict().items() if k != 'objective')})"

    # -- the path ---------------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t, d alpha / dt, d sigma / dt), shaped like t."""
        if self.path == "linear":
            return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
        half_pi = math.pi / 2
        return torch.sin(t * half_pi), torch.cos(t * half_pi), half_pi * torch.cos(t * half_pi), -half_pi * torch.sin(t * half_pi)

    def interpolate(self, data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, u_t) for data, noise and times t of shape (N,)."""
        alpha, sigma, d_alpha, d_sigma = self.alpha_sigma(expand_to(t, data))
        return alpha * data + sigma * noise, d_alpha * data + d_sigma * noise

    # -- training ---------------------------------------------------------------------------
    def draw_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training times: uniform in [0, 1) or logit-normal, then the time shift."""
        if self.t_sampling == "uniform":
            t = torch.rand(n, generator=generator, device=device)
        else:  # SD3: noise level sigmoid(N(mean, std)), t = 1 - that
            t = 1 - torch.sigmoid(self.t_mean + self.t_std * torch.randn(n, generator=generator, device=device))
        return shift_time(t, self.time_shift)

    def to_velocity(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity a network output (its first C channels) stands for at (x, t): itself, or
        for x-prediction the velocity that carries x_t to the predicted image."""
        out = out[:, : x.shape[1]]
        if self.prediction == "velocity":
            return out
        alpha, sigma, d_alpha, d_sigma = self.alpha_sigma(expand_to(t, x))
        return d_alpha * out + d_sigma * (x - alpha * out) / sigma.clamp(min=X_PRED_MIN_SIGMA)

    def data_prediction(self, out: torch.Tensor, x: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
        """The clean image a network output (at the network's time t_net) predicts: for a velocity,
        the data that x_t = alpha data + sigma noise and u = d_alpha data + d_sigma noise give
        together, (d_sigma x - sigma u) / (d_sigma alpha - sigma d_alpha); on the linear path
        x + (1 - t) u. What APG projects on."""
        out = out[:, : x.shape[1]]
        if self.prediction == "data":
            return out
        return self.velocity_to_data(out, x, self.unit_time(t_net))

    def velocity_to_data(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean image a velocity v at (x, t) implies (t in [0, 1]): what `data_prediction`
        returns for a velocity network, and what the multistep flow sampler extrapolates."""
        alpha, sigma, d_alpha, d_sigma = self.alpha_sigma(expand_to(t, x))
        return (d_sigma * x - sigma * v) / (d_sigma * alpha - sigma * d_alpha)

    def velocity(self, model_fn, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """The network's velocity at (x, t), with t on the network's scale."""
        return self.to_velocity(model_fn(x, t * self.time_scale, **model_kwargs), x, t)

    def training_losses(self, model, data: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, **model_kwargs):
        """{"loss": (N,), "mse": (N,)[, "cos"]}: the per-sample mean of (v - u_t)^2, SiT's velocity loss
        (for x-prediction v is the velocity the predicted image implies: JiT's x-prediction, v-loss),
        plus cos_loss * (1 - cos(v, u_t)) per sample when that weight is set (LightningDiT)."""
        if noise is None:
            noise = torch.randn_like(data)
        xt, ut = self.interpolate(data, noise, t)
        out = model(xt, t * self.time_scale, **model_kwargs)
        C = data.shape[1]
        assert out.shape[0] == data.shape[0] and out.shape[1] in (C, 2 * C) and out.shape[2:] == data.shape[2:], out.shape
        v = self.to_velocity(out.float(), xt, t)
        terms = {"mse": mean_flat((v - ut) ** 2)}
        terms["loss"] = terms["mse"]
        if self.cos_loss:
            terms["cos"] = 1 - torch.nn.functional.cosine_similarity(v.flatten(1), ut.flatten(1), dim=1)
            terms["loss"] = terms["mse"] + self.cos_loss * terms["cos"]
        return terms

    # -- sampling ---------------------------------------------------------------------------
    def unit_time(self, t_net: torch.Tensor) -> torch.Tensor:
        """The network's time on ditkit's common [0, 1] scale (0 = noise, 1 = data)."""
        return t_net / self.time_scale

    def time_grid(self, steps: int, t0: float = 0.0, t1: float = 1.0, shift: float | None = None, device=None) -> torch.Tensor:
        """steps + 1 times from t0 to t1 (float32, as SiT's linspace), shifted like training unless told otherwise."""
        t = torch.linspace(t0, t1, steps + 1, device=device)
        return shift_time(t, self.time_shift if shift is None else shift)

    def score(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) from the velocity (SiT's get_score_from_velocity)."""
        alpha, sigma, d_alpha, d_sigma = self.alpha_sigma(expand_to(t, x))
        ratio = alpha / d_alpha
        return (ratio * v - x) / (sigma**2 - ratio * d_sigma * sigma)

    def sde_diffusion(self, x: torch.Tensor, t: torch.Tensor, form: str = "sigma", norm: float = 1.0) -> torch.Tensor:
        """SiT's diffusion coefficient w(t) of the reverse SDE dx = (v + w score) dt + sqrt(2 w) dW."""
        t = expand_to(t, x)
        alpha, sigma, d_alpha, d_sigma = self.alpha_sigma(t)
        forms = {
            "constant": lambda: norm * torch.ones_like(t),
            "SBDM": lambda: norm * (d_alpha / alpha * sigma**2 - sigma * d_sigma),
            "sigma": lambda: norm * sigma,
            "linear": lambda: norm * (1 - t),
            "decreasing": lambda: 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2,
            "increasing-decreasing": lambda: norm * torch.sin(math.pi * t) ** 2,
        }
        if form not in forms:
            raise ValueError(f"unknown SDE diffusion form {form!r}; choose one of {', '.join(forms)}.")
        return forms[form]()
