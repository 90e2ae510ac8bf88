"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): the network learns
the average velocity over an interval, so one evaluation crosses from noise to data.

Time runs as in the rest of ditkit, the opposite way to the paper: t = 0 is noise, t = 1 is data,
x_t = t * data + (1 - t) * noise and the velocity is v = data - noise. The network sits at time t
and looks ahead to a time r >= t; it predicts the average velocity over [t, r],

    u(x_t, t, r) = 1 / (r - t) * integral_t^r v(x_s, s) ds,   so that   x_r = x_t + (r - t) * u,

and u(x_t, t, t) is the instantaneous velocity (flow matching). The paper's (t, r) with r <= t is
ours mirrored, t_paper = 1 - t and r_paper = 1 - r, and its velocity (noise - data) is minus ours:
u_ours = -u_paper. Differentiating (r - t) u = integral_t^r v ds in t along the path gives the
MeanFlow identity, which reads the same in both directions:

    u(x_t, t, r) = v(x_t, t) - (t - r) * d/dt u(x_t, t, r),   d/dt u = v . d_x u + d_t u,

the total derivative being one Jacobian-vector product of the network with tangents (v, 1) on
(x_t, t) and 0 on r (r stays out of the jvp's inputs, which is the same). The target is taken
under stop-gradient, as in the paper.

What the paper adds, and this follows:
- a share `share` of each batch has r > t; the rest r = t (plain flow matching, no jvp needed).
  Both times are drawn from the logit-normal (or uniform) of `t_sampling`, and sorted; the paper's
  best ImageNet setting is lognorm(-0.4, 1) in its own noise level, which `t_mean = -0.4` means
  here too (FlowMatching's logit-normal draws the noise level 1 - t).
- the adaptive loss weight: the per-sample squared error ||u - u_tgt||^2 (summed over elements,
  as the official code) divided by sg(||u - u_tgt||^2 + 0.01)^p.
- guidance folded into training: the velocity in the target (and the jvp's tangent) is
  v_g = omega * v + kappa * u(x_t, t, t | y) + (1 - omega - kappa) * u(x_t, t, t | null), the
  model's own instantaneous predictions without gradient; the effective guidance scale is
  omega / (1 - kappa). Samples whose label was dropped (the null class) keep v_g = v, so the
  null class keeps learning the unconditional field.

The jvp runs without gradient on the r > t rows only; the prediction that trains is a plain
forward of the whole batch (the same u, so the same gradient), which keeps one differentiated
network call per step. PyTorch's fused CPU attention has no forward-mode derivative, so the jvp
runs SDPA's math backend.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ObjectiveConfig
from .common import expand_to
from .flow import FlowMatching

ADAPTIVE_EPS = 0.01  # c in the adaptive weight 1 / (||error||^2 + c)^p (the official code's norm_eps)


class MeanFlow(FlowMatching):
    """The average-velocity objective on the linear path; as a FlowMatching, `velocity` is the
    network at r = t, so the flow samplers (euler, heun, ...) run a MeanFlow model too."""

    name = "meanflow"

    def __init__(self, t_sampling: str = "uniform", t_mean: float = 0.0, t_std: float = 1.0, time_scale: float = 1.0,
                 share: float = 0.25, power: float = 1.0, omega: float = 1.0, kappa: float = 0.0,
                 null_class: int | None = None):  # fmt: skip
        super().__init__(t_sampling=t_sampling, t_mean=t_mean, t_std=t_std, time_scale=time_scale)
        self.config = ObjectiveConfig(objective="meanflow", t_sampling=t_sampling, t_mean=t_mean, t_std=t_std, time_scale=time_scale,
                                      mf_share=share, mf_power=power, mf_omega=omega, mf_kappa=kappa)  # fmt: skip
        self.share, self.power, self.omega, self.kappa = share, power, omega, kappa
        self.guided = (omega, kappa) != (1.0, 0.0)
        self.null_class = null_class  # needed to train with guidance only
        self.jvp = average_velocity_jvp

    @classmethod
    def from_config(cls, c: ObjectiveConfig, null_class: int | None = None) -> "MeanFlow":
        return cls(t_sampling=c.t_sampling, t_mean=c.t_mean, t_std=c.t_std, time_scale=c.time_scale, share=c.mf_share,
                   power=c.mf_power, omega=c.mf_omega, kappa=c.mf_kappa, null_class=null_class)  # fmt: skip

    def __repr__(self) -> str:
        return f"MeanFlow({', '.join(f'{k}={v!r}' for k, v in self.config.to_dict().items() if k != 'objective')})"

    def compile(self) -> None:
        """torch.compile the jvp: called from inside a compiled network it would run eagerly."""
        self.jvp = torch.compile(average_velocity_jvp)

    # -- training ---------------------------------------------------------------------------
    def draw_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n, 2): rows (t, r) with t <= r, two of FlowMatching's times sorted. Which rows keep r
        and which train at r = t is `training_losses`'s choice (by position in the batch)."""
        times = super().draw_t(2 * n, generator, device).view(2, n)
        return torch.stack([times.min(0).values, times.max(0).values], dim=1)  # (n, 2)

    def average_velocity(self, model_fn, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """The network's u(x, t, r), times on its scale."""
        return model_fn(x, t * self.time_scale, r=r * self.time_scale, **model_kwargs)[:, : x.shape[1]]

    def guided_velocity(self, model_fn, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """v_g = omega v + kappa u(x, t, t | y) + (1 - omega - kappa) u(x, t, t | null); v where y is null."""
        if not self.guided:
            return v
        if self.null_class is None:
            raise ValueError("MeanFlow's guidance in training needs the model's null class; build the objective with null_class=config.null_class.")
        null = torch.full_like(y, self.null_class)
        with torch.no_grad():
            if self.kappa:  # conditional and null in one batch of 2N
                both = self.velocity(model_fn, torch.cat([xt, xt]), torch.cat([t, t]), y=torch.cat([y, null])).float()
                cond, uncond = both.chunk(2)
            else:
                cond, uncond = 0.0, self.velocity(model_fn, xt, t, y=null).float()
        v_g = self.omega * v + self.kappa * cond + (1 - self.omega - self.kappa) * uncond
        return torch.where(expand_to(y == self.null_class, v), v, v_g)

    def training_losses(self, model_fn, data: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, y=None, **model_kwargs):
        """{"loss": (N,), "mse": (N,)}: the adaptively weighted ||u - sg(u_tgt)||^2 per sample (at
        p = 1 its value stays near 1, each sample's gradient normalised: "mse", the plain
        per-element mean, is the error to watch). `t` is draw_t's (N, 2); the last
        round(share * N) rows keep their r, the others train at r = t."""
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"MeanFlow trains on (t, r) pairs of shape (N, 2), got times of shape {tuple(t.shape)}; draw them with draw_t.")
        if noise is None:
            noise = torch.randn_like(data)
        n = data.shape[0]
        k = round(self.share * n)  # rows that average over r > t
        t, r = t[:, 0], torch.cat([t[: n - k, 0], t[n - k :, 1]])
        xt, v = self.interpolate(data, noise, t)
        v_g = self.guided_velocity(model_fn, xt, t, v, y)  # (N, C, H, W)
        target = v_g
        if k:
            du_dt = self.jvp(self, model_fn, xt[n - k :], t[n - k :], r[n - k :], v_g[n - k :], y[n - k :], model_kwargs)
            target = torch.cat([v_g[: n - k], v_g[n - k :] - expand_to(t[n - k :] - r[n - k :], du_dt) * du_dt])
        u = self.average_velocity(model_fn, xt, t, r, y=y, **model_kwargs).float()
        sq = ((u - target.detach()) ** 2).flatten(1).sum(1)  # (N,)
        weight = (sq.detach() + ADAPTIVE_EPS) ** -self.power
        return {"loss": weight * sq, "mse": sq / data[0].numel()}


def average_velocity_jvp(flow: MeanFlow, model_fn, xt, t, r, tangent, y, model_kwargs) -> torch.Tensor:
    """d/dt u(x_t, t, r) along the path: the jvp of the network with tangents (tangent, 1) on
    (x_t, t), r held; no gradient flows through it (it only makes the target)."""

    def u(x, s):
        return flow.average_velocity(model_fn, x, s, r, y=y, **model_kwargs)

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no forward-mode derivative
        _, du_dt = torch.func.jvp(u, (xt, t), (tangent, torch.ones_like(t)))
    return du_dt  # (k, C, H, W)
