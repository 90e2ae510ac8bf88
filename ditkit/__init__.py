"""ditkit: Diffusion Transformers (Peebles & Xie, 2023), faithful to the official release."""

from .config import DiTConfig, ObjectiveConfig
from .models import PRESETS, DiT
from .objectives import FlowMatching, GaussianDiffusion
from .objectives.gaussian import space_timesteps
from .samplers import SAMPLERS, cfg_model, sample

__all__ = ["DiT", "DiTConfig", "PRESETS", "GaussianDiffusion", "FlowMatching", "ObjectiveConfig", "space_timesteps", "sample",
           "cfg_model", "SAMPLERS"]  # fmt: skip
__version__ = "0.1.0"
