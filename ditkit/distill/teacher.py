"""The teacher of `ditkit distill`: a frozen flow-matching DiT with its default sampling, and the
pieces of its ODE the methods share (the guided velocity, one solver step, the denoised estimate)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import infer_config, load_model, read_checkpoint
from ..config import DiTConfig, ObjectiveConfig, Sampling, SamplingOptions
from ..models import DiT
from ..objectives import FlowMatching, build_objective
from ..objectives.common import expand_to
from ..pipeline import resolve_sampling
from ..utils.io import read_pt
from ..utils.runs import find_checkpoint


@dataclass
class Teacher:
    """A frozen flow-matching DiT with its objective, its default sampling and its training data."""

    model: DiT
    objective: FlowMatching
    sampling: Sampling
    data: str | None
    path: Path


def recorded_data(path: Path) -> str | None:
    """The data a ditkit checkpoint was trained on: config.json's "data", a training checkpoint's args."""
    if path.is_dir() or path.suffix == ".safetensors":
        config = (path if path.is_dir() else path.parent) / "config.json"
        return json.loads(config.read_text()).get("data") if config.exists() else None
    args = read_pt(path).get("args")
    return args.get("data_path") if isinstance(args, dict) else None


def load_teacher(name: str, device: torch.device) -> Teacher:
    """The teacher `--teacher` names, or one sentence on why it cannot be distilled."""
    path = find_checkpoint(name)
    ck = read_checkpoint(path)
    config = ck.config or infer_config(ck.state)
    if not isinstance(config, DiTConfig):
        raise ValueError(f"{path} is not a class-conditional DiT (it is a text-to-image MMDiT, or no DiT at all); ditkit distill takes class-conditional DiT teachers.")
    kind = ck.meta.get("objective", {}).get("objective", "gaussian")  # what records none samples as the paper's diffusion
    if kind != "flow":
        raise ValueError(f"{path} is a {kind} diffusion model, and ditkit distill needs a flow-matching teacher; distil a model trained with ditkit train --objective flow.")
    model = load_model(ck).to(device).requires_grad_(False).eval()
    objective = build_objective(ObjectiveConfig(**ck.meta["objective"]), learn_sigma=model.config.learn_sigma)
    sampling = resolve_sampling(SamplingOptions(), "flow", ck.meta.get("sampling", {}), ck.official)
    return Teacher(model, objective, sampling, recorded_data(path), path)


def guided_velocity(model, flow: FlowMatching, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w,
                    interval: tuple[float, float] | None = None) -> torch.Tensor:  # fmt: skip
    """The guided velocity v_null + w (v_cond - v_null) of `model` at per-sample times t (flow time,
    0 = noise); w is a number or (N,), 1 where t lies outside `interval`. Unlike samplers.cfg_model,
    every sample has its own t. A cfg_embed model takes w as its input, in one pass."""
    if isinstance(w, (int, float)) and w == 1.0:
        return flow.velocity(model, x, t, y=y)
    if interval is not None:
        inside = (t >= interval[0]) & (t <= interval[1])
        w = torch.where(inside, torch.as_tensor(w, dtype=t.dtype, device=t.device), 1.0)  # (N,)
    if model.config.cfg_embed:
        return flow.velocity(model, x, t, y=y, cfg_scale=torch.as_tensor(w, device=t.device).expand(len(x)))
    null = torch.full_like(y, model.config.null_class)
    v = flow.velocity(model, torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))  # (2N, C, H, W)
    cond, uncond = v.chunk(2)
    w = torch.as_tensor(w, dtype=v.dtype, device=v.device)
    return uncond + (expand_to(w, v) if w.ndim else w) * (cond - uncond)


def ode_step(v, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, solver: str) -> torch.Tensor:
    """One step of dx/dt = v(x, t) from per-sample times t0 to t1 as the fixed-grid sampler
    `solver` takes it: euler; heun2 (Heun everywhere); heun (Euler on a step that ends at t = 1)."""
    dt = expand_to(t1 - t0, x)
    k1 = v(x, t0)
    if solver == "euler":
        return x + dt * k1
    heun = x + dt * 0.5 * (k1 + v(x + dt * k1, t1))
    return torch.where(expand_to(t1 >= 1, x), x + dt * k1, heun) if solver == "heun" else heun


def denoised(flow: FlowMatching, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The data the velocity v points to from x at flow time t: x = a d + s n and v = a' d + s' n
    solved for d (on the linear path x + (1 - t) v, where one Euler step to t = 1 lands)."""
    a, s, da, ds = flow.alpha_sigma(expand_to(t, x))
    return (ds * x - s * v) / (a * ds - s * da)
