"""Objectives: what the network is trained to predict, and what the samplers make of it."""

from ..config import ObjectiveConfig
from .flow import FlowMatching
from .gaussian import GaussianDiffusion

__all__ = ["GaussianDiffusion", "FlowMatching", "ObjectiveConfig", "build_objective", "objective_name"]


def objective_name(objective) -> str:
    if isinstance(objective, GaussianDiffusion):
        return "gaussian"
    if isinstance(objective, FlowMatching):
        return "flow"
    raise ValueError(f"{type(objective).__name__} is not an objective; pass a ditkit.GaussianDiffusion or a ditkit.FlowMatching.")


def build_objective(config: ObjectiveConfig, learn_sigma: bool = True):
    """The objective a config describes (a model's learn_sigma decides the diffusion's variance)."""
    if config.objective == "flow":
        return FlowMatching.from_config(config)
    return GaussianDiffusion(learn_sigma=learn_sigma)
