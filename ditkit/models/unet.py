"""The U-Net baseline of the design study: diffusers' UNet2DModel behind DiT's interface."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import UNetConfig


class UNetBaseline(nn.Module):
    """UNet2DModel behind DiT's interface: forward(x, t, y) -> (N, C or 2C, H, W), y == num_classes
    the null label (an extra embedding row whenever labels are dropped in training)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = c = config
        if c.base_channels % 8:
            raise ValueError(f"the U-Net's base width must be a multiple of 8 (its group norms), got {c.base_channels}.")
        if c.input_size % 2 ** (c.levels - 1):
            raise ValueError(f"a {c.levels}-level U-Net needs an input size divisible by {2 ** (c.levels - 1)}, got {c.input_size}.")
        self.num_classes = c.num_classes
        self.grad_checkpointing = False
        attn = tuple(i > 0 for i in range(c.levels))
        self.unet = UNet2DModel(
            sample_size=c.input_size, in_channels=c.in_channels, out_channels=c.out_channels,
            block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            # Head width and group count only split the channels: the largest powers of two (up to
            # ADM's 64 channels per head and 32 groups) that divide every level's width.
            attention_head_dim=math.gcd(c.base_channels, 64), norm_num_groups=math.gcd(c.base_channels, 32),
            class_embed_type=None, num_class_embeds=c.num_classes + int(c.class_dropout_prob > 0),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=y).sample  # (N, C_out, H, W)
