"""ditkit: Diffusion Transformers (Peebles & Xie, 2023), faithful to the official release.

The names below load on first use, so `import ditkit` and the command line's --help stay
instant; `ditkit.DiT` imports torch then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__ as __version__  # one source, read by pyproject.toml too

# public name -> the submodule that defines it
_EXPORTS = {
    "DiT": "checkpoints", "DiTConfig": "config", "PRESETS": "config", "ObjectiveConfig": "config",
    "GaussianDiffusion": "objectives", "FlowMatching": "objectives", "space_timesteps": "objectives.gaussian",
    "sample": "samplers", "SAMPLERS": "samplers", "cfg_model": "samplers",
    "MMDiT": "models.mmdit", "MMDiTConfig": "config", "MMDIT_PRESETS": "config", "TextCondition": "models.mmdit",
    "UViT": "checkpoints", "UViTConfig": "config", "UVIT_PRESETS": "config",
}  # fmt: skip
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what a type checker sees: the same names, imported
    from .config import PRESETS as PRESETS, DiTConfig as DiTConfig, MMDiTConfig as MMDiTConfig, ObjectiveConfig as ObjectiveConfig
    from .config import MMDIT_PRESETS as MMDIT_PRESETS, UVIT_PRESETS as UVIT_PRESETS, UViTConfig as UViTConfig
    from .models.mmdit import MMDiT as MMDiT, TextCondition as TextCondition
    from .checkpoints import DiT as DiT, UViT as UViT
    from .objectives import FlowMatching as FlowMatching, GaussianDiffusion as GaussianDiffusion
    from .objectives.gaussian import space_timesteps as space_timesteps
    from .samplers import SAMPLERS as SAMPLERS, cfg_model as cfg_model, sample as sample


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ditkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
