"""Objectives: what the network is trained to predict, and what the samplers make of it."""

from ..config import ObjectiveConfig
from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .vp import VPDiffusion

__all__ = ["GaussianDiffusion", "FlowMatching", "VPDiffusion", "ObjectiveConfig", "build_objective", "objective_name"]


def objective_name(objective) -> str:
    for cls in (GaussianDiffusion, FlowMatching, VPDiffusion):
        if isinstance(objective, cls):
            return cls.name
    raise ValueError(f"{type(objective).__name__} is not an objective; pass a ditkit.GaussianDiffusion, FlowMatching or VPDiffusion.")


def build_objective(config: ObjectiveConfig, learn_sigma: bool = True):
    """The objective a config describes (a model's learn_sigma decides the diffusion's variance)."""
    if config.objective == "flow":
        return FlowMatching.from_config(config)
    if config.objective == "vp":
        return VPDiffusion()
    return GaussianDiffusion(learn_sigma=learn_sigma, schedule=config.betas, time_offset=config.time_offset)
