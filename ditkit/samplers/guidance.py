"""Guidance and mixed precision as wrappers around the model function: classifier-free guidance
(against the null condition), autoguidance (against a weaker model), and guidance-distilled networks."""

from __future__ import annotations

from typing import Callable

import torch

from ..utils.devices import autocast


def projected(delta: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor, to_data: Callable, eta: float) -> torch.Tensor:
    """APG's update (Sadat et al. 2024): `delta` (a guidance direction in the network's output space)
    with its part parallel to the conditional prediction of the image, per sample, scaled by eta.
    The output and the image prediction are related by one affine map per (x, t), so the projection
    is taken onto the image prediction D and carried back unchanged."""
    d = to_data(cond, x, t).flatten(1)  # (N, C*H*W): the conditional prediction of the image
    flat = delta.flatten(1)
    coef = (flat * d).sum(1, keepdim=True) / d.pow(2).sum(1, keepdim=True).clamp_min(1e-12)  # (N, 1)
    return delta - (1 - eta) * (coef * d).view_as(delta)


def cfg_model(model_fn: Callable, cfg_scale: float, cfg_channels: int | None = None,
              interval: tuple[float, float] | None = None, unit_time: Callable | None = None,
              apg_eta: float | None = None, to_data: Callable | None = None) -> Callable:  # fmt: skip
    """Classifier-free guidance around `model_fn`, on a batch whose first half is conditional and
    second half null (the official `forward_with_cfg`): out = uncond + s * (cond - uncond), both
    halves computed at the conditional x in one batched call.

    cfg_channels=3 guides the first three output channels only, as the official code does; None
    guides every channel of the prediction (the input's channels) and leaves the variance channels
    as each half predicted them. `interval=(lo, hi)` guides only where `unit_time(t)` (0 = noise,
    1 = data) lies in [lo, hi]; elsewhere one unguided call on the conditional half serves both
    halves, at half the cost. With `apg_eta` (and the objective's `to_data`), guidance is APG's:
    cond + (s - 1) * `projected`(cond - uncond). Returns `model_fn` itself when cfg_scale is 1.
    """
    if cfg_scale == 1.0:
        return model_fn
    if interval is not None and unit_time is None:
        raise ValueError("a guidance interval needs the objective's unit_time to place t in [0, 1].")

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        n = len(x) // 2
        half = x[:n]
        if interval is not None:
            u = float(unit_time(t[:1].float())[0])
            if not interval[0] <= u <= interval[1]:
                half_kwargs = {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}  # a MeanFlow model's r
                out = model_fn(half, t[:n], y[:n], **half_kwargs)  # (N, C_out, H, W): the conditional prediction
                return torch.cat([out, out])
        k = x.shape[1] if cfg_channels is None else cfg_channels
        out = model_fn(torch.cat([half, half]), t, y, **kwargs)  # (2N, C_out, H, W)
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = torch.split(eps, n, dim=0)
        if apg_eta is None:
            half_eps = uncond + cfg_scale * (cond - uncond)
        else:
            half_eps = cond + (cfg_scale - 1) * projected(cond - uncond, cond, half, t[:n], to_data, apg_eta)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    return guided


def autoguided_model(model_fn: Callable, guide_fn: Callable, cfg_scale: float, cfg_channels: int | None = None,
                     interval: tuple[float, float] | None = None, unit_time: Callable | None = None,
                     apg_eta: float | None = None, to_data: Callable | None = None) -> Callable:  # fmt: skip
    """Autoguidance (Karras et al. 2024): out = guide + s * (model - guide), where the guide is a
    weaker model of the same data (smaller, or trained less) given the same condition, in place of
    classifier-free guidance's unconditional prediction. It pushes samples away from the weak
    model's errors rather than toward what sets one class apart from all, so it sharpens without
    narrowing the distribution as much. The batch is N (no null half); each guided step runs the
    model and the guide once each. `cfg_channels`, `interval` and `apg_eta` as in `cfg_model`;
    outside the interval the guide is not run. Returns `model_fn` itself when cfg_scale is 1."""
    if cfg_scale == 1.0:
        return model_fn
    if interval is not None and unit_time is None:
        raise ValueError("a guidance interval needs the objective's unit_time to place t in [0, 1].")

    def guided(x: torch.Tensor, t: torch.Tensor, y, **kwargs) -> torch.Tensor:
        out = model_fn(x, t, y, **kwargs)  # (N, C_out, H, W)
        if interval is not None and not interval[0] <= float(unit_time(t[:1].float())[0]) <= interval[1]:
            return out
        k = x.shape[1] if cfg_channels is None else cfg_channels
        weak = guide_fn(x, t, y, **kwargs)[:, :k]  # the guide's own extra channels (a variance) are not used
        strong = out[:, :k]
        if apg_eta is None:
            guided_k = weak + cfg_scale * (strong - weak)
        else:
            guided_k = strong + (cfg_scale - 1) * projected(strong - weak, strong, x, t, to_data, apg_eta)
        return torch.cat([guided_k, out[:, k:]], dim=1)

    return guided


def embedded_cfg_model(model_fn: Callable, cfg_scale: float, interval: tuple[float, float] | None = None,
                       unit_time: Callable | None = None) -> Callable:  # fmt: skip
    """Guidance of a guidance-distilled network (DiTConfig.cfg_embed) in one pass of N: the scale is
    an input of the network; outside `interval` it gets 1, as `cfg_model` runs it unguided there."""
    if interval is not None and unit_time is None:
        raise ValueError("a guidance interval needs the objective's unit_time to place t in [0, 1].")

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        w = cfg_scale
        if interval is not None and not interval[0] <= float(unit_time(t[:1].float())[0]) <= interval[1]:
            w = 1.0
        return model_fn(x, t, y, cfg_scale=w, **kwargs)

    return guided


def autocast_model(model: torch.nn.Module, precision: str) -> Callable:
    """The model as a function run under autocast in `precision`, returning float32."""

    def fn(x, t, y, **kwargs):
        with autocast(x.device, precision):
            return model(x, t, y, **kwargs).float()

    return fn


def null_condition(y, config):
    """The null condition of guidance for conditions y: the condition's own (the empty prompt of a
    prompt batch) or, for class ids, the network's null class (`config.null_class`)."""
    if isinstance(y, torch.Tensor):
        return torch.full_like(y, config.null_class if hasattr(config, "null_class") else config.num_classes)
    return y.null()
