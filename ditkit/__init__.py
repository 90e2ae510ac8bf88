"""ditkit: Diffusion Transformers (Peebles & Xie, 2023), faithful to the official release."""

from .config import DiTConfig, MMDiTConfig, ObjectiveConfig
from .models import PRESETS, DiT
from .models.mmdit import MMDIT_PRESETS, MMDiT, TextCondition
from .objectives import FlowMatching, GaussianDiffusion
from .objectives.gaussian import space_timesteps
from .samplers import SAMPLERS, cfg_model, sample

__all__ = ["DiT", "DiTConfig", "PRESETS", "MMDiT", "MMDiTConfig", "MMDIT_PRESETS", "TextCondition", "GaussianDiffusion",
           "FlowMatching", "ObjectiveConfig", "space_timesteps", "sample", "cfg_model", "SAMPLERS"]  # fmt: skip
__version__ = "0.1.0"
