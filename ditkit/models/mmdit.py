"""MMDiT, the multimodal Diffusion Transformer of Stable Diffusion 3 (Esser et al. 2024), read top to bottom.

Image patches and text tokens keep two streams, each with its own weights (adaLN, qkv, MLP), and
meet in one joint attention over the concatenated sequence. RMSNorm on every head's queries and
keys (QK-norm) keeps the attention logits bounded in long or bf16 training. The timestep and the
pooled text embedding make the vector c that modulates both streams (adaLN-Zero); the text stream
of the last block only lends its keys and values, and the final layer decodes the image stream.

`VideoMMDiT` is the same network over clips: the video DiT's tubelets and 3-D sin-cos positions
in place of patches, so the text tokens and all spacetime tokens meet in every joint attention.

`forward(x, t, cond)` takes a `TextCondition` where a DiT takes labels: rows slice, concatenate
and have a null (the empty prompt) as a label tensor does, so the samplers and guidance need
nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MMDIT_PRESETS, VIDEO_MMDIT_PRESETS, MMDiTConfig, VideoMMDiTConfig
from .dit import DiT, FinalLayer, init_backbone
from .layers import (
    HeadNorm,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    TubeletEmbed,
    attention,
    make_norm,
    modulate,
)
from .video import VideoDiT

__all__ = ["MMDIT_PRESETS", "VIDEO_MMDIT_PRESETS", "MMDiT", "MMDiTConfig", "TextCondition", "VideoMMDiT", "VideoMMDiTConfig", "build_mmdit"]


@dataclass(frozen=True, eq=False)
class TextCondition:
    """Encoded prompts: token embeddings, their padding mask and a pooled embedding per prompt.
    `empty` is the empty prompt's encoding (one row), the null condition of guidance."""

    tokens: torch.Tensor  # (N, L, D_ctx)
    mask: torch.Tensor  # (N, L) bool, True on real tokens
    pooled: torch.Tensor  # (N, D_pool)
    empty: TextCondition | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows) -> TextCondition:
        """Rows by slice or index tensor, as on a label tensor."""
        return replace(self, tokens=self.tokens[rows], mask=self.mask[rows], pooled=self.pooled[rows])

    def to(self, device) -> TextCondition:
        empty = self.empty.to(device) if self.empty is not None else None
        return TextCondition(self.tokens.to(device), self.mask.to(device), self.pooled.to(device), empty)

    def pad_to(self, length: int) -> TextCondition:
        """The same prompts with masked zero tokens appended up to `length`: the model's output is unchanged."""
        extra = length - self.tokens.shape[1]
        if extra <= 0:
            return self
        return replace(self, tokens=F.pad(self.tokens, (0, 0, 0, extra)), mask=F.pad(self.mask, (0, extra), value=False))

    def null(self) -> TextCondition:
        """The empty prompt for every row: what label dropout's null class is for a DiT."""
        if self.empty is None:
            raise ValueError("this TextCondition carries no empty-prompt encoding; make it with ditkit.text.TextEncoder, which adds it.")
        n = len(self)
        e = self.empty
        return replace(e, tokens=e.tokens.expand(n, -1, -1), mask=e.mask.expand(n, -1), pooled=e.pooled.expand(n, -1), empty=e)

    @staticmethod
    def cat(conds: list[TextCondition]) -> TextCondition:
        """Rows of all `conds` in order, padded to the longest token sequence."""
        length = max(c.tokens.shape[1] for c in conds)
        conds = [c.pad_to(length) for c in conds]
        return TextCondition(torch.cat([c.tokens for c in conds]), torch.cat([c.mask for c in conds]),
                             torch.cat([c.pooled for c in conds]), conds[0].empty)  # fmt: skip


class Stream(nn.Module):
    """One stream's weights in a joint block. `pre_only` (the text stream of the last block): only
    keys and values for the image tokens, so no output projection, MLP or gates."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.num_heads, self.pre_only = num_heads, pre_only
        head_dim = hidden_size // num_heads
        self.norm1 = make_norm("layernorm", hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = HeadNorm(head_dim, eps=1e-6)
        self.k_norm = HeadNorm(head_dim, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.norm2 = make_norm("layernorm", hidden_size)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def pre(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
        """(q, k, v), each (N, H, T, D/H) with q and k RMS-normalised, and the modulation left for `post`."""
        shift, scale, *rest = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)
        N, T, D = x.shape
        qkv = self.qkv(modulate(self.norm1(x), shift, scale)).reshape(N, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, D/H)
        # QK-norm in float32 (its weights' dtype, under autocast too), then back to v's dtype for SDPA.
        return self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype), v, tuple(rest)

    def post(self, x: torch.Tensor, attn: torch.Tensor, mods: tuple) -> torch.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Both streams attend together over [text; image] tokens; each keeps its own weights."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, last: bool):
        super().__init__()
        self.context_block = Stream(hidden_size, num_heads, mlp_ratio, pre_only=last)
        self.x_block = Stream(hidden_size, num_heads, mlp_ratio)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c: torch.Tensor, mask: torch.Tensor):
        """x: (N, T, D), ctx: (N, L, D), c: (N, D), mask: (N, 1, 1, L + T) -> (x, ctx or None)."""
        N, T, D = x.shape
        L = ctx.shape[1]
        qc, kc, vc, mods_c = self.context_block.pre(ctx, c)
        qx, kx, vx, mods_x = self.x_block.pre(x, c)
        k, v = torch.cat([kc, kx], dim=2), torch.cat([vc, vx], dim=2)  # (N, H, L + T, D/H)
        if self.context_block.pre_only:  # only the image tokens ask
            out = attention(qx, k, v, mask)  # (N, H, T, D/H)
            return self.x_block.post(x, out.transpose(1, 2).reshape(N, T, D), mods_x), None
        out = attention(torch.cat([qc, qx], dim=2), k, v, mask)  # (N, H, L + T, D/H)
        out = out.transpose(1, 2).reshape(N, L + T, D)
        return self.x_block.post(x, out[:, L:], mods_x), self.context_block.post(ctx, out[:, :L], mods_c)


class MMDiT(nn.Module):
    """`forward(x, t, cond)` -> (N, C or 2C, H, W) for noisy x, timesteps t and a TextCondition."""

    unpatchify = DiT.unpatchify  # the same token layout

    def __init__(self, config: MMDiTConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = MMDiTConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        self.config = c = config
        self.in_channels, self.out_channels, self.patch_size = c.in_channels, c.out_channels, c.patch_size
        self.grad_checkpointing = False  # recompute block activations in backward (set by the trainer)

        video = isinstance(c, VideoMMDiTConfig)  # tubelets of a clip (VideoMMDiT) instead of an image's patches
        self.x_embedder = TubeletEmbed(c.tubelet, c.patch_size, c.in_channels, c.hidden_size) if video else PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.context_embedder = nn.Linear(c.context_dim, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.pooled_embedder = nn.Sequential(nn.Linear(c.pooled_dim, c.hidden_size), nn.SiLU(), nn.Linear(c.hidden_size, c.hidden_size))
        self.num_patches = math.prod(c.grid) if video else (c.input_size // c.patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, c.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(JointBlock(c.hidden_size, c.num_heads, c.mlp_ratio, last=i == c.depth - 1) for i in range(c.depth))
        # Each token decodes to its patch, or its tubelet: p x p positions of C_out x t values.
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels * (c.tubelet if video else 1), modulated=True)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MMDiT:
        return cls(MMDiTConfig.from_preset(name, **overrides))

    def initialize_weights(self) -> None:
        """DiT's initialisation, with every adaLN gate, shift and scale of both streams at zero."""
        init_backbone(self)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in [s.adaLN_modulation[-1] for b in self.blocks for s in (b.context_block, b.x_block)] + [
            self.final_layer.adaLN_modulation[-1], self.final_layer.linear,
        ]:  # fmt: skip
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """x: (N, C, H, W) noisy input; t: (N,) timesteps; cond: N encoded prompts."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D); a clip's T' x S tokens in frame-major order
        ctx = self.context_embedder(cond.tokens)  # (N, L, D)
        c = self.t_embedder(t) + self.pooled_embedder(cond.pooled)  # (N, D)
        keep = torch.cat([cond.mask.bool(), cond.mask.new_ones(x.shape[:2], dtype=torch.bool)], dim=1)  # (N, L + T)
        mask = keep[:, None, None, :]  # (N, 1, 1, L + T): padding tokens are never attended to
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x, ctx = checkpoint(blk, x, ctx, c, mask, use_reentrant=False)
            else:
                x, ctx = blk(x, ctx, c, mask)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W), or a clip's (N, C_out, T, H, W)


class VideoMMDiT(MMDiT):
    """Text to video. `forward(x, t, cond)` -> (N, C or 2C, T, H, W) for noisy clips, timesteps and a TextCondition."""

    unpatchify = VideoDiT.unpatchify  # tubelets back to frames

    def __init__(self, config: VideoMMDiTConfig | None = None, **kwargs):
        if config is None:
            config = VideoMMDiTConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        super().__init__(config)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> VideoMMDiT:
        return cls(VideoMMDiTConfig.from_preset(name, **overrides))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """x: (N, C, T, H, W) noisy clips; t: (N,) timesteps; cond: N encoded prompts."""
        if tuple(x.shape[1:]) != self.config.sample_shape:
            raise ValueError(f"this text-to-video MMDiT takes clips of shape {self.config.sample_shape} (C, T, H, W), got {tuple(x.shape[1:])}.")
        return super().forward(x, t, cond)


def build_mmdit(config: MMDiTConfig) -> MMDiT:
    """The text-conditioned network a config describes: over clips for a VideoMMDiTConfig, else over images."""
    return VideoMMDiT(config) if isinstance(config, VideoMMDiTConfig) else MMDiT(config)
