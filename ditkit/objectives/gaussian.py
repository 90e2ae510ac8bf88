"""Gaussian diffusion of the paper (ADM's formulation): float64 schedules, eps prediction,
learned-range or fixed variance, the hybrid MSE + VB loss, and the official respacing.

Coefficients are computed in float64 and cast to float32 when gathered for a batch, exactly
as the official `_extract_into_tensor` does, so results agree to float32 round-off.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import ObjectiveConfig
from .common import mean_flat
from .vp import DiscreteVPSchedule

NUM_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # linear schedule endpoints for 1000 steps
SD_BETA_START, SD_BETA_END = 0.00085, 0.012  # Stable Diffusion's scaled-linear schedule (U-ViT-H's)


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    scale = 1000 / num_timesteps  # keeps the schedule's shape for other step counts, as ADM does
    return np.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """Stable Diffusion's "scaled linear" betas: linear in sqrt(beta)."""
    return np.linspace(SD_BETA_START**0.5, SD_BETA_END**0.5, num_timesteps, dtype=np.float64) ** 2


BETAS = {"linear": linear_betas, "scaled-linear": scaled_linear_betas}


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> set[int]:
    """The official `space_timesteps`: "250" -> 250 evenly strided steps, "ddim50" -> stride
    that gives exactly 50 steps, "10,15,20" -> that many steps in each third."""
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride; use a plain step count.")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count <= 0 or size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size}; use 1..{size} steps.")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * k) for k in range(count)]  # round() as the official loop
        start += size
    return set(steps)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM's decoder NLL)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """The paper's diffusion: linear betas 1e-4..0.02 over 1000 steps, the model predicts eps
    (and, with learn_sigma, an interpolation between the two variance bounds).

    `respaced(n)` gives the same process on a subset of steps (the official SpacedDiffusion):
    its model calls receive the original timesteps through `timestep_map`. `schedule` names the
    betas ("scaled-linear": Stable Diffusion's), and the network sees step k as k + `time_offset`
    (U-ViT-H counts its steps from 1: offset 1).
    """

    name = "gaussian"

    def __init__(
        self,
        learn_sigma: bool = True,
        num_timesteps: int = NUM_TIMESTEPS,
        sigma_small: bool = False,
        betas: np.ndarray | None = None,
        timestep_map: list[int] | None = None,
        base_timesteps: int | None = None,
        schedule: str = "linear",
        time_offset: int = 0,
    ):
        betas = BETAS[schedule](num_timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.schedule, self.time_offset = schedule, time_offset
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.num_timesteps = len(betas)
        self.timestep_map = list(range(len(betas))) if timestep_map is None else list(timestep_map)
        self.base_timesteps = base_timesteps or len(betas)  # the steps the network was trained on

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.betas = betas
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0: clip the log by repeating the value at t = 1
        # (beta_0 for a one-step process, where no noise is added anyway).
        first = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)
        if sigma_small:
            self.fixed_variance = self.posterior_variance
            self.fixed_log_variance = self.posterior_log_variance_clipped
        else:  # "fixed large": beta_t, with the posterior's value at t = 0 for a better NLL
            self.fixed_variance = np.append(first, betas[1:])
            self.fixed_log_variance = np.log(self.fixed_variance)
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    # -- respacing -------------------------------------------------------------------------
    def respaced(self, steps: int | str) -> "GaussianDiffusion":
        """The process restricted to `space_timesteps(T, steps)`, with betas recomputed."""
        if isinstance(steps, int) and steps <= 0:
            raise ValueError(f"the number of sampling steps must be positive, got {steps}.")
        use = space_timesteps(self.num_timesteps, str(steps) if isinstance(steps, int) else steps)
        last, new_betas, new_map = 1.0, [], []
        for i, a in enumerate(self.alphas_cumprod):
            if i in use:
                new_betas.append(1 - a / last)
                last = a
                new_map.append(self.timestep_map[i])
        return GaussianDiffusion(self.learn_sigma, sigma_small=self.sigma_small, betas=np.array(new_betas), timestep_map=new_map,
                                 base_timesteps=self.base_timesteps, schedule=self.schedule, time_offset=self.time_offset)  # fmt: skip

    def __repr__(self) -> str:
        return f"GaussianDiffusion(learn_sigma={self.learn_sigma}, num_timesteps={self.num_timesteps}, schedule={self.schedule!r})"

    @property
    def config(self) -> ObjectiveConfig:
        return ObjectiveConfig(objective="gaussian", betas=self.schedule, time_offset=self.time_offset)

    def vp_schedule(self) -> DiscreteVPSchedule:
        """The process in continuous time, as DPM-Solver reads a discrete one: t_n = n / T."""
        if self.timestep_map != list(range(self.num_timesteps)):
            raise ValueError("DPM-Solver takes the full diffusion, not a respaced one; pass GaussianDiffusion().")
        return DiscreteVPSchedule(self.betas, self.time_offset)

    def draw_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training timesteps: uniform integers in [0, T), as the official train.py."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def unit_time(self, t_model: torch.Tensor) -> torch.Tensor:
        """The network's timestep on ditkit's common [0, 1] scale (0 = noise at T - 1, 1 = data at 0)."""
        return 1 - (t_model.float() - self.time_offset) / (self.base_timesteps - 1)

    # -- coefficients ----------------------------------------------------------------------
    def _extract(self, name: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """arr[t] as float32, shaped to broadcast against `shape` (official _extract_into_tensor)."""
        key = (name, str(t.device))
        arr = self._cache.get(key)
        if arr is None:
            arr = self._cache[key] = torch.from_numpy(np.asarray(getattr(self, name))).to(t.device)
        return arr[t].float().reshape(-1, *([1] * (len(shape) - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of this (possibly respaced) process -> the timesteps the model was trained on."""
        return self._extract_long("timestep_map", t) + self.time_offset

    def _extract_long(self, name: str, t: torch.Tensor) -> torch.Tensor:
        key = (name, str(t.device))
        arr = self._cache.get(key)
        if arr is None:
            arr = self._cache[key] = torch.tensor(getattr(self, name), dtype=torch.long, device=t.device)
        return arr[t]

    # -- forward process -------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._extract("sqrt_alphas_cumprod", t, x0.shape) * x0 + self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x0.shape
        ) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t, x_t.shape) * x0 + self._extract(
            "posterior_mean_coef2", t, x_t.shape
        ) * x_t
        return (
            mean,
            self._extract("posterior_variance", t, x_t.shape),
            self._extract("posterior_log_variance_clipped", t, x_t.shape),
        )

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t.shape
        ) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - x0) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t.shape
        )

    # -- reverse process -------------------------------------------------------------------
    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False):
        """p(x_{t-1} | x_t) from the network output: {"mean", "variance", "log_variance", "pred_xstart"}."""
        C = x.shape[1]
        if self.learn_sigma:
            assert model_output.shape == (x.shape[0], 2 * C, *x.shape[2:]), model_output.shape
            model_output, var_values = torch.split(model_output, C, dim=1)
            min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
            max_log = self._extract("log_betas", t, x.shape)
            frac = (var_values + 1) / 2  # the network outputs v in [-1, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            variance = self._extract("fixed_variance", t, x.shape) + torch.zeros_like(x)
            log_variance = self._extract("fixed_log_variance", t, x.shape) + torch.zeros_like(x)
        pred_xstart = self.predict_x0_from_eps(x, t, model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def model_output(self, model, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        return model(x, self.model_timesteps(t), **model_kwargs)

    # -- training --------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """The variational bound term at t in bits per dim (decoder NLL at t = 0)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, **model_kwargs):
        """{"loss", "mse", ("vb")}, each (N,): eps MSE, plus with learned Σ the VB term computed on
        a detached mean so that it trains only the variance (the official hybrid loss)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = self.model_output(model, x_t, t, **model_kwargs)
        terms = {}
        if self.learn_sigma:
            C = x_t.shape[1]
            assert out.shape == (x_t.shape[0], 2 * C, *x_t.shape[2:]), out.shape
            out, var_values = torch.split(out, C, dim=1)
            frozen = torch.cat([out.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t)
        terms["mse"] = mean_flat((noise - out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
