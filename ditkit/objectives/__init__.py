"""Objectives: what the network is trained to predict, and what the samplers make of it."""

from ..config import ObjectiveConfig
from .flow import FlowMatching
from .gaussian import GaussianDiffusion
from .meanflow import MeanFlow
from .vp import VPDiffusion

__all__ = ["GaussianDiffusion", "FlowMatching", "MeanFlow", "VPDiffusion", "ObjectiveConfig", "build_objective", "objective_name"]


def objective_name(objective) -> str:
    for cls in (GaussianDiffusion, FlowMatching, VPDiffusion):
        if isinstance(objective, cls):
            return objective.name  # a subclass's own: MeanFlow is a FlowMatching named "meanflow"
    raise ValueError(f"{type(objective).__name__} is not an objective; pass a ditkit.GaussianDiffusion, FlowMatching, MeanFlow or VPDiffusion.")


def build_objective(config: ObjectiveConfig, learn_sigma: bool = True, null_class: int | None = None):
    """The objective a config describes (a model's learn_sigma decides the diffusion's variance;
    its null class is MeanFlow's unconditional label when guidance is folded into training)."""
    if config.objective == "flow":
        return FlowMatching.from_config(config)
    if config.objective == "meanflow":
        return MeanFlow.from_config(config, null_class=null_class)
    if config.objective == "vp":
        return VPDiffusion()
    return GaussianDiffusion(learn_sigma=learn_sigma, schedule=config.betas, time_offset=config.time_offset)
