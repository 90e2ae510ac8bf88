"""Samplers of the flow objective, integrating from t = 0 (noise) to t = 1 (data) as SiT does.

ODE: `euler` and `heun2` on a fixed grid of `steps` steps (SiT's num_steps = steps + 1),
`heun` (EDM's and k-diffusion's Heun: the step onto the data, t = 1, is Euler), the multistep
`dpm++2m-flow` (DPM-Solver++(2M) on the flow's log-SNR), and adaptive
`dopri5` (torchdiffeq, as SiT). SDE: Euler-Maruyama (`sde-euler`) and Heun
(`sde-heun`) on dx = (v + w score) dt + sqrt(2 w) dW with SiT's diffusion forms, up to
t = 1 - last_step_size, then SiT's last step ("Mean": one drift step of that size).
The time grid takes the SD3 shift (`time_shift`; default: the objective's).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..objectives.flow import FlowMatching
from .gaussian import randn_like

SDE_LAST_STEPS = ("Mean", "Euler", "Tweedie", None)


def _velocity(model_fn, flow: FlowMatching, extra_args: dict):
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow.velocity(model_fn, x, t.expand(x.shape[0]), **extra_args)

    return v


def _fixed_grid(step, model_fn, flow, x, steps, extra_args, callback, progress, time_shift):
    v = _velocity(model_fn, flow, extra_args or {})
    ts = flow.time_grid(steps, shift=time_shift, device=x.device)
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        x = step(v, x, ts[i], ts[i + 1])
        if callback is not None:
            callback({"i": steps - 1 - i, "t": ts[i + 1], "x": x})
    return x


def euler(model_fn, flow: FlowMatching, x, steps, extra_args=None, callback=None, generator=None, progress=False, time_shift=None):
    """Euler on the probability-flow ODE dx/dt = v(x, t): one model call per step."""

    def step(v, x, t0, t1):
        return x + (t1 - t0) * v(x, t0)

    return _fixed_grid(step, model_fn, flow, x, steps, extra_args, callback, progress, time_shift)


def heun2(model_fn, flow: FlowMatching, x, steps, extra_args=None, callback=None, generator=None, progress=False, time_shift=None):
    """Heun's second-order method (torchdiffeq's heun2), the last step included: two model calls per step."""

    def step(v, x, t0, t1):
        dt = t1 - t0
        k1 = v(x, t0)
        k2 = v(x + dt * k1, t0 + dt)
        return x + dt * (0.5 * k1 + 0.5 * k2)

    return _fixed_grid(step, model_fn, flow, x, steps, extra_args, callback, progress, time_shift)


def heun(model_fn, flow: FlowMatching, x, steps, extra_args=None, callback=None, generator=None, progress=False, time_shift=None):
    """Heun as EDM samples (Karras et al. 2022, k-diffusion's sample_heun): second order on every
    step but the one that ends at t = 1, which is Euler, so 2 * steps - 1 model calls. The velocity
    at t = 1 itself is degenerate (x is the data there; the noise it should point away from is gone)
    and a model trained with logit-normal times has barely seen t > 0.95, so heun2's corrector at
    t = 1 adds visible noise to such a model's samples (docs/samplers)."""

    def step(v, x, t0, t1):
        dt = t1 - t0
        k1 = v(x, t0)
        if t1 >= 1.0:
            return x + dt * k1
        k2 = v(x + dt * k1, t1)
        return x + dt * (0.5 * k1 + 0.5 * k2)

    return _fixed_grid(step, model_fn, flow, x, steps, extra_args, callback, progress, time_shift)


def dpmpp_2m_flow(model_fn, flow: FlowMatching, x, steps, extra_args=None, callback=None, generator=None, progress=False, time_shift=None):
    """DPM-Solver++(2M) (Lu et al. 2022) on the flow ODE: one model call per step. The path
    x_t = alpha_t data + sigma_t noise is a diffusion of log-SNR lambda = log(alpha / sigma), so the
    multistep update of the data prediction applies as it stands (diffusers does the same with
    flow sigmas). The step from pure noise (lambda = -inf) and the step onto the data are first
    order; on the linear path a first-order step is Euler's."""
    v = _velocity(model_fn, flow, extra_args or {})
    ts = flow.time_grid(steps, shift=time_shift, device=x.device)
    before = None  # the last step's data prediction and log-SNR increment, once that is finite
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        a0, s0, _, _ = flow.alpha_sigma(ts[i])
        a1, s1, _, _ = flow.alpha_sigma(ts[i + 1])
        data = flow.velocity_to_data(v(x, ts[i]), x, ts[i])
        if s1 <= 0:  # onto the data
            x = data
        elif a0 <= 0:  # from pure noise: e^-h = 0
            x = s1 / s0 * x + a1 * data
        else:
            h = torch.log(a1 / s1) - torch.log(a0 / s0)
            d = data if before is None else data + (data - before[0]) * h / (2 * before[1])
            x = s1 / s0 * x - a1 * torch.expm1(-h) * d
            before = (data, h)
        if callback is not None:
            callback({"i": steps - 1 - i, "t": ts[i + 1], "x": x})
    return x


def dopri5(model_fn, flow: FlowMatching, x, steps=None, extra_args=None, callback=None, generator=None, progress=False,
           time_shift=None, atol=1e-6, rtol=1e-3, max_steps=1000):  # fmt: skip
    """Adaptive Dormand-Prince 5(4) through torchdiffeq with SiT's tolerances; `steps` is unused
    (the solver picks its own). Each try of a step, accepted or rejected, costs 6 model calls (2 more
    to start); a stiff ODE (an extreme guidance scale) would shrink the steps without end, so more
    than `max_steps` tries is an ArithmeticError. `callback` gets {"i": tries left, "t", "x": the
    state so far, "nfe": model calls so far} before each try, so a caller can stop the solver there
    by raising, as it can between the steps of the fixed-step samplers. The time shift reparametrises
    the ODE's time."""
    from torchdiffeq import odeint

    v = _velocity(model_fn, flow, extra_args or {})
    shift = flow.time_shift if time_shift is None else time_shift
    bar = tqdm(disable=not progress, desc="sampling (model calls)", leave=False)
    nfe, tries = 0, 0

    def shifted(s):  # s is the unshifted time the solver integrates over
        return s / (s + shift * (1 - s))

    def f(s, x):  # dx/ds = v(x, t) dt/ds
        nonlocal nfe
        nfe += 1
        bar.update()
        if shift == 1.0:
            return v(x, s)
        return v(x, shifted(s)) * shift / (s + shift * (1 - s)) ** 2

    def before_try(s, x, ds):  # torchdiffeq calls it before every try, accepted or rejected
        nonlocal tries
        tries += 1
        if tries > max_steps:
            raise ArithmeticError(f"dopri5 did not reach t = 1 within {max_steps} steps ({nfe} model calls): its error estimate "
                                  "does not settle (an extreme guidance scale makes the ODE stiff); use a fixed-step sampler "
                                  "such as heun, or a lower guidance scale.")  # fmt: skip
        if callback is not None:
            callback({"i": max_steps - tries + 1, "t": shifted(s), "x": x, "nfe": nfe})

    f.callback_step = before_try
    span = torch.tensor([0.0, 1.0], device=x.device)
    try:
        x = odeint(f, x, span, method="dopri5", atol=atol, rtol=rtol)[-1]
    finally:
        bar.close()
    if callback is not None:
        callback({"i": 0, "t": span[-1], "x": x, "nfe": nfe})
    return x


def _sde(heun: bool, model_fn, flow: FlowMatching, x, steps, extra_args, callback, generator, progress, time_shift,
         diffusion_form, diffusion_norm, last_step, last_step_size):  # fmt: skip
    if last_step not in SDE_LAST_STEPS:
        raise ValueError(f"unknown SDE last step {last_step!r}; choose one of {', '.join(map(str, SDE_LAST_STEPS))}.")
    if not 0 <= last_step_size < 1:
        raise ValueError(f"the SDE's last step size must lie in [0, 1), got {last_step_size}.")
    v = _velocity(model_fn, flow, extra_args or {})
    last_step_size = 0.0 if last_step is None else last_step_size
    t1 = 1.0 - last_step_size  # SiT stops the SDE short of t = 1 and takes a last deterministic step
    ts = flow.time_grid(steps, 0.0, t1, shift=time_shift, device=x.device)

    def w(x, t):
        return flow.sde_diffusion(x, t.expand(x.shape[0]), diffusion_form, diffusion_norm)

    def drift(x, t):
        vel = v(x, t)
        return vel + w(x, t) * flow.score(vel, x, t.expand(x.shape[0]))

    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        t, dt = ts[i], ts[i + 1] - ts[i]
        dw = randn_like(x, generator) * torch.sqrt(dt)
        if heun:  # SiT's Heun step: noise first, then Heun on the drift
            x = x + torch.sqrt(2 * w(x, t)) * dw
            k1 = drift(x, t)
            k2 = drift(x + dt * k1, t + dt)
            x = x + 0.5 * dt * (k1 + k2)
        else:
            x = x + drift(x, t) * dt + torch.sqrt(2 * w(x, t)) * dw
        if callback is not None:
            callback({"i": steps - i, "t": ts[i + 1], "x": x})
    t = ts[-1]
    if last_step == "Mean":
        x = x + drift(x, t) * last_step_size
    elif last_step == "Euler":
        x = x + v(x, t) * last_step_size
    elif last_step == "Tweedie":
        alpha, sigma, _, _ = flow.alpha_sigma(t)
        x = x / alpha + sigma**2 / alpha * flow.score(v(x, t), x, t.expand(x.shape[0]))
    if callback is not None:
        callback({"i": 0, "t": torch.ones_like(t), "x": x})
    return x


def sde_euler(model_fn, flow: FlowMatching, x, steps, extra_args=None, callback=None, generator=None, progress=False,
              time_shift=None, diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean", last_step_size=0.04):  # fmt: skip
    """Euler-Maruyama on SiT's reverse SDE (SiT's `sample.py SDE` defaults): steps + 1 model calls."""
    return _sde(False, model_fn, flow, x, steps, extra_args, callback, generator, progress, time_shift,
                diffusion_form, diffusion_norm, last_step, last_step_size)  # fmt: skip


def sde_heun(model_fn, flow: FlowMatching, x, steps, extra_args=None, callback=None, generator=None, progress=False,
             time_shift=None, diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean", last_step_size=0.04):  # fmt: skip
    """SiT's stochastic Heun on the same SDE: 2 * steps + 1 model calls."""
    return _sde(True, model_fn, flow, x, steps, extra_args, callback, generator, progress, time_shift,
                diffusion_form, diffusion_norm, last_step, last_step_size)  # fmt: skip
