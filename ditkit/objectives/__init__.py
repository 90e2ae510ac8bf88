"""Objectives: what the network is trained to predict, and what the samplers make of it."""

from ..config import ObjectiveConfig
from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .meanflow import MeanFlow

__all__ = ["GaussianDiffusion", "FlowMatching", "MeanFlow", "ObjectiveConfig", "build_objective", "objective_name"]


def objective_name(objective) -> str:
    if isinstance(objective, GaussianDiffusion):
        return "gaussian"
    if isinstance(objective, FlowMatching):
        return objective.name  # "flow", or "meanflow" for its subclass
    raise ValueError(f"{type(objective).__name__} is not an objective; pass a ditkit.GaussianDiffusion, FlowMatching or MeanFlow.")


def build_objective(config: ObjectiveConfig, learn_sigma: bool = True, null_class: int | None = None):
    """The objective a config describes (a model's learn_sigma decides the diffusion's variance;
    its null class is MeanFlow's unconditional label when guidance is folded into training)."""
    if config.objective == "flow":
        return FlowMatching.from_config(config)
    if config.objective == "meanflow":
        return MeanFlow.from_config(config, null_class=null_class)
    return GaussianDiffusion(learn_sigma=learn_sigma)
