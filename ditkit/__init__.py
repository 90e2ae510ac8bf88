"""ditkit: Diffusion Transformers (Peebles & Xie, 2023), faithful to the official release."""

from .diffusion import GaussianDiffusion, space_timesteps
from .models import PRESETS, DiT, DiTConfig
from .sampling import SAMPLERS, cfg_model, sample

__all__ = ["DiT", "DiTConfig", "PRESETS", "GaussianDiffusion", "space_timesteps", "sample", "cfg_model", "SAMPLERS"]
__version__ = "0.1.0"
