"""Networks: forward(...) only; no loss, no guidance, no distributed code. They import nothing of
ditkit but its configs and each other."""

from ..config import BLOCKS, PRESET_SIZES, PRESETS, DataShape, DiTConfig, UNetConfig, UViTConfig
from .dit import DiT
from .layers import LabelEmbedder
from .uvit import UViT

__all__ = ["BLOCKS", "PRESET_SIZES", "PRESETS", "DataShape", "DiTConfig", "UNetConfig", "UViTConfig", "DiT", "UViT", "LabelEmbedder"]
