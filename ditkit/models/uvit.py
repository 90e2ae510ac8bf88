"""U-ViT (Bao et al., *All are Worth Words: A ViT Backbone for Diffusion Models*, CVPR 2023).

Everything is a token: the class label (when there is one), the timestep and the image patches
enter one sequence with learned positions, and a plain ViT processes it. Two things make it a
diffusion backbone: long skips, where the output of each of the first depth/2 blocks is
concatenated into the mirror block of the last depth/2 and projected back by `skip_linear`, and a
3x3 convolution after the patches are folded back into an image.

Constructor keywords, state-dict keys and shapes equal the official network (baofff/U-ViT,
`libs/uvit.py`), so released checkpoints load with strict=True and `forward(x, timesteps, y)`
gives the official output. The model knows nothing of schedules, losses or guidance.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import UVIT_PRESETS, UVIT_SIZES, UViTConfig
from .layers import PatchEmbed, attention, timestep_embedding

__all__ = ["UViT", "UViTConfig", "UVIT_PRESETS", "UVIT_SIZES"]

def trunc_normal_(w: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) cut to [-2, 2] (absolute bounds: at std 0.02 a plain normal) by the inverse CDF,
    the method of the timm 0.3.2 code U-ViT ships, so that a seed gives the official weights
    (recent PyTorch's nn.init.trunc_normal_ draws by rejection instead)."""

    def cdf(z: float) -> float:
        return (1 + math.erf(z / (std * math.sqrt(2)))) / 2

    with torch.no_grad():
        w.uniform_(2 * cdf(-2) - 1, 2 * cdf(2) - 1).erfinv_()  # a uniform in (-1, 1) mapped to N(0, 1/2)
        return w.mul_(std * math.sqrt(2)).clamp_(-2, 2)


class Attention(nn.Module):
    """Multi-head self-attention; the official keys (qkv with an optional bias, proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attention(*qkv.unbind(0))  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))  # (N, T, D)


class Mlp(nn.Module):
    """fc1, exact GELU, fc2 (timm's Mlp, which U-ViT uses; DiT's MLP takes the tanh GELU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm ViT block; an out-block first merges its long skip: Linear(concat(x, skip))."""

    def __init__(self, c: UViTConfig, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.embed_dim)
        self.attn = Attention(c.embed_dim, c.num_heads, c.qkv_bias)
        self.norm2 = nn.LayerNorm(c.embed_dim)
        self.mlp = Mlp(c.embed_dim, int(c.embed_dim * c.mlp_ratio))
        self.skip_linear = nn.Linear(2 * c.embed_dim, c.embed_dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (N, T, 2D) -> (N, T, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT. `forward(x, timesteps, y=None)` -> (N, C, H, W), the predicted noise.

    Build it from a UViTConfig or from the official keywords: UViT(img_size=32, patch_size=2,
    in_chans=4, embed_dim=1152, depth=28, num_heads=16, num_classes=1001, conv=False).
    """

    def __init__(self, config: UViTConfig | None = None, *, norm_layer: type[nn.Module] | None = None, **kwargs):
        super().__init__()
        if norm_layer not in (None, nn.LayerNorm):
            raise ValueError(f"ditkit's U-ViT normalises with nn.LayerNorm, as every released U-ViT; norm_layer={norm_layer!r} is not supported.")
        c = self.config = UViTConfig(**kwargs) if config is None else replace(config, **kwargs)
        self.grad_checkpointing = c.use_checkpoint  # recompute block activations in backward (training only)
        self.extras = 1 + c.conditional  # tokens in front of the patches: [label], time
        num_patches = (c.img_size // c.patch_size) ** 2

        # Created in the official order, so that under one seed both draw the same initial weights.
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        if c.mlp_time_embed:
            self.time_embed = nn.Sequential(nn.Linear(c.embed_dim, 4 * c.embed_dim), nn.SiLU(), nn.Linear(4 * c.embed_dim, c.embed_dim))
        else:
            self.time_embed = nn.Identity()  # the sinusoid itself is the time token
        if c.conditional:
            self.label_emb = nn.Embedding(c.num_classes, c.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, c.embed_dim))  # learned, all tokens
        self.in_blocks = nn.ModuleList(Block(c) for _ in range(c.depth // 2))
        self.mid_block = Block(c)
        self.out_blocks = nn.ModuleList(Block(c, skip=c.skip) for _ in range(c.depth // 2))
        self.norm = nn.LayerNorm(c.embed_dim)
        self.decoder_pred = nn.Linear(c.embed_dim, c.patch_size**2 * c.in_chans)
        self.final_layer = nn.Conv2d(c.in_chans, c.in_chans, 3, padding=1) if c.conv else nn.Identity()
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UViT":
        """A U-ViT at one of the paper's sizes: UViT.from_preset("U-ViT-H/2", img_size=32, in_chans=4, num_classes=1001, conv=False)."""
        return cls(UViTConfig.from_preset(name, **overrides))

    def initialize_weights(self) -> None:
        """The official initialisation: truncated normals (std 0.02) for the positions and every
        Linear, zero biases, unit LayerNorms; convolutions and the label table keep PyTorch's defaults."""
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.config.in_chans, self.config.patch_size
        h = w = self.config.img_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _run(self, block: Block, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpointing and self.training:
            return checkpoint(block, x, skip, use_reentrant=False)
        return block(x, skip)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) noisy input; timesteps: (N,) the times the model was trained on, integer
        or fractional (the official code feeds 999 t or 1000 t); y: (N,) labels, or None for an
        unconditional U-ViT."""
        c = self.config
        if tuple(x.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(f"this U-ViT takes {c.in_chans}-channel {c.img_size}x{c.img_size} inputs (its learned positions fit "
                             f"no other size), got shape {tuple(x.shape)}; resize the input or build the model for it.")  # fmt: skip
        if (y is None) == c.conditional:
            raise ValueError("this U-ViT is class-conditional: pass labels y (its null class for unconditional outputs)."
                             if c.conditional else "this U-ViT is unconditional (num_classes <= 0): call it without labels.")  # fmt: skip
        tokens = self.patch_embed(x)  # (N, L, D)
        time_token = self.time_embed(timestep_embedding(timesteps, c.embed_dim).to(tokens.dtype))[:, None]  # (N, 1, D)
        front = [time_token] if y is None else [self.label_emb(y)[:, None], time_token]  # label first, then time
        h = torch.cat([*front, tokens], dim=1) + self.pos_embed  # (N, extras + L, D)

        skips = []
        for blk in self.in_blocks:
            h = self._run(blk, h)
            skips.append(h)
        h = self._run(self.mid_block, h)
        for blk in self.out_blocks:  # deepest in-block feeds the first out-block
            h = self._run(blk, h, skips.pop())

        h = self.decoder_pred(self.norm(h))  # (N, extras + L, p*p*C)
        h = h[:, self.extras :]  # (N, L, p*p*C): the front tokens decode to nothing
        return self.final_layer(self.unpatchify(h))  # (N, C, H, W)
