"""A Diffusion Transformer over video, read top to bottom.

A clip (N, C, T, H, W) is cut into tubelets of t x p x p (Sora's spacetime patches), each a token,
placed by 3-D sin-cos positions and/or 3-D RoPE over (frame, row, column). The DiT's blocks and
adaLN-Zero conditioning on time and class are reused unchanged; only what each block's attention
covers differs, by `config.attention` (Latte's arrangements and one for long clips):

    joint       every block over all T' x S tokens                      cost ~ (T' S)^2 per block
    factorized  blocks in turn within each frame (spatial) and across   ~ T' S^2 and S T'^2
                frames at each position (temporal)
    windowed    every block within `window` consecutive token frames,   ~ T' S (window S)
                odd blocks over windows shifted by half of one

`forward(x, t, y)` -> (N, C or 2C, T, H, W); y == num_classes is the null label, as for a DiT.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VIDEO_PRESETS, VideoDiTConfig
from .dit import DiT, DiTBlock, FinalLayer
from .layers import (
    Attention,
    LabelEmbedder,
    TimestepEmbedder,
    TubeletEmbed,
    apply_rope_axes,
    attention,
    get_3d_sincos_pos_embed,
    rope_3d,
)

__all__ = ["VIDEO_PRESETS", "VideoDiTConfig", "VideoDiT", "block_modes"]


def block_modes(c: VideoDiTConfig) -> list[str]:
    """What each block's attention covers: joint, spatial / temporal in turn, or window / shifted in turn."""
    pair = {"joint": ("joint", "joint"), "factorized": ("spatial", "temporal"), "windowed": ("window", "shifted")}[c.attention]
    return [pair[i % 2] for i in range(c.depth)]


def shifted_window_mask(frames: int, window: int, per_frame: int) -> torch.Tensor:
    """(windows, 1, L_w, L_w) bool, True = attend, for windows shifted by half a window: the last
    window wraps around (the clip's last half-window and its first) and its two halves stay apart."""
    half = window // 2
    # The original frame of each position after rolling the frames back by half a window.
    original = (torch.arange(frames) + half) % frames  # (T,)
    side = (original < half).repeat_interleave(per_frame).view(frames // window, window * per_frame)  # (windows, L_w)
    return (side[:, :, None] == side[:, None, :])[:, None]  # (windows, 1, L_w, L_w)


class SpacetimeAttention(Attention):
    """Multi-head self-attention over a clip's frame-major tokens (N, T' x S, D) within the groups of
    `mode`; 3-D RoPE (on the whole grid) turns q and k before they are grouped. Its parameters,
    projections and QK-norm are `Attention`'s, so LoRA targets and checkpoints read the same."""

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope_axes(x, cos, sin)

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int, int], mode: str, window: int, qk_norm: bool = False):
        super().__init__(dim, num_heads, qk_norm)
        self.mode, self.window = mode, window
        self.frames, self.per_frame = grid[0], grid[1] * grid[2]
        if mode == "shifted":
            self.register_buffer("mask", shifted_window_mask(self.frames, window, self.per_frame), persistent=False)

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, T' S, d) -> (N G, H, L_g, d): the groups that attend within themselves."""
        N, H, L, d = x.shape
        T, S = self.frames, self.per_frame
        if self.mode == "joint":
            return x
        x = x.view(N, H, T, S, d)
        if self.mode == "spatial":
            return x.transpose(1, 2).reshape(N * T, H, S, d)  # one group per frame
        if self.mode == "temporal":
            return x.permute(0, 3, 1, 2, 4).reshape(N * S, H, T, d)  # one group per position
        if self.mode == "shifted":
            x = x.roll(-(self.window // 2), dims=2)
        w = self.window
        return x.view(N, H, T // w, w * S, d).transpose(1, 2).reshape(N * (T // w), H, w * S, d)  # one group per window

    def ungroup(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """`group`'s inverse: (N G, H, L_g, d) -> (N, H, T' S, d)."""
        H, d = x.shape[1], x.shape[-1]
        T, S = self.frames, self.per_frame
        if self.mode == "joint":
            return x
        if self.mode == "spatial":
            return x.view(n, T, H, S, d).transpose(1, 2).reshape(n, H, T * S, d)
        if self.mode == "temporal":
            return x.view(n, S, H, T, d).permute(0, 2, 3, 1, 4).reshape(n, H, T * S, d)
        x = x.view(n, T // self.window, H, self.window * S, d).transpose(1, 2).reshape(n, H, T, S, d)
        if self.mode == "shifted":
            x = x.roll(self.window // 2, dims=2)
        return x.reshape(n, H, T * S, d)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        N, L, D = x.shape
        q, k, v = self.heads(x, rope)  # each (N, H, L, D/H)
        mask = self.mask.repeat(N, 1, 1, 1) if self.mode == "shifted" else None  # (N windows, 1, L_w, L_w)
        out = self.ungroup(attention(self.group(q), self.group(k), self.group(v), mask), N)  # (N, H, L, D/H)
        return self.proj(out.transpose(1, 2).reshape(N, L, D))  # (N, L, D)


class VideoBlock(DiTBlock):
    """A DiT block (any of its conditioning designs but in-context) whose attention covers the
    spacetime tokens that `mode` groups together."""

    def __init__(self, c: VideoDiTConfig, mode: str):
        super().__init__(c)
        self.attn = SpacetimeAttention(c.hidden_size, c.num_heads, c.grid, mode, c.window, qk_norm=c.qk_norm)


class VideoDiT(nn.Module):
    """Video Diffusion Transformer. `forward(x, t, y)` -> (N, C or 2C, T, H, W); y == num_classes is null."""

    initialize_weights = DiT.initialize_weights  # the official initialisation, adaLN-Zero's zeros included

    def __init__(self, config: VideoDiTConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = VideoDiTConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        self.config = c = config
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        self.patch_size, self.num_heads, self.num_classes = c.patch_size, c.num_heads, c.num_classes
        self.grad_checkpointing = False  # recompute block activations in backward (set by the trainer)

        self.x_embedder = TubeletEmbed(c.tubelet, c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        self.num_patches = math.prod(c.grid)
        if "sincos" in c.pos_embed:  # fixed tables, rebuilt (not saved) on load
            table = torch.tensor(get_3d_sincos_pos_embed(c.hidden_size, c.grid), dtype=torch.float32)
            self.register_buffer("pos_sincos", table[None], persistent=False)  # (1, L, D)
        if "rope" in c.pos_embed:
            cos, sin = rope_3d(c.grid, c.hidden_size // c.num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(VideoBlock(c, mode) for mode in block_modes(c))
        # Each token decodes to its tubelet: p x p positions of C_out x t values (FinalLayer's "channels").
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels * c.tubelet, c.block.startswith("adaln"), c.norm)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VideoDiT:
        return cls(VideoDiTConfig.from_preset(name, **overrides))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*t*C) -> (N, C, T, H, W)."""
        c, p, t = self.out_channels, self.patch_size, self.config.tubelet
        frames, h, w = self.config.grid
        x = x.reshape(x.shape[0], frames, h, w, p, p, t, c)
        x = x.permute(0, 7, 1, 6, 2, 4, 3, 5)  # (N, C, T', t, h, p, w, p)
        return x.reshape(x.shape[0], c, frames * t, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, T, H, W) noisy clips; t: (N,) timesteps; y: (N,) labels, num_classes = null."""
        if tuple(x.shape[1:]) != self.config.sample_shape:
            raise ValueError(f"this video DiT takes clips of shape {self.config.sample_shape} (C, T, H, W), got {tuple(x.shape[1:])}.")
        x = self.x_embedder(x)  # (N, L, D)
        if hasattr(self, "pos_sincos"):
            x = x + self.pos_sincos
        rope = (self.rope_cos, self.rope_sin) if hasattr(self, "rope_cos") else None
        t_emb, y_emb = self.t_embedder(t), self.y_embedder(y)  # (N, D) each
        c = t_emb + y_emb if self.config.block.startswith("adaln") else torch.stack([t_emb, y_emb], dim=1)  # (N, D) or (N, 2, D)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, c, rope, use_reentrant=False)
            else:
                x = blk(x, c, rope)
        x = self.final_layer(x, c if self.config.block.startswith("adaln") else None)  # (N, L, p*p*t*C_out)
        return self.unpatchify(x)  # (N, C_out, T, H, W)
