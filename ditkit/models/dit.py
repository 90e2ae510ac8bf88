"""The Diffusion Transformer of Peebles & Xie (2023), read top to bottom.

State-dict keys and shapes equal the official release, so its checkpoints load with
strict=True. The model knows nothing of losses, guidance or distribution: forward(x, t, y).
A guidance-distilled DiT (cfg_embed) also takes the guidance scale, forward(x, t, y, cfg_scale),
embedded like t and added to the conditioning; the scale itself is applied by nobody but the network.
A MeanFlow DiT (time_inputs=2) also takes the end r of the interval it averages over,
forward(x, t, y, r=r), with r - t embedded like t and added to the conditioning.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DiTConfig
from .layers import (
    Attention,
    CrossAttention,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    get_3d_sincos_pos_embed,
    make_mlp,
    make_norm,
    modulate,
    rope_2d,
)

class DiTBlock(nn.Module):
    """One transformer block in any of the paper's four conditioning designs.

    adaln_zero: shift, scale and a residual gate per branch regressed from c (gates start at 0).
    adaln: shift and scale only.  cross_attn: c as two tokens attended after self-attention.
    in_context: c already sits in the sequence as tokens, so the block is a plain ViT block.
    """

    def __init__(self, c: DiTConfig):
        super().__init__()
        self.block = block = c.block
        hidden_size, num_heads = c.hidden_size, c.num_heads
        self.norm1 = make_norm(c.norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm=c.qk_norm)
        self.norm2 = make_norm(c.norm, hidden_size)
        self.mlp = make_mlp(c.mlp, hidden_size, c.mlp_ratio, c.mlp_conv)
        if block == "cross_attn":
            self.norm_cross = make_norm(c.norm, hidden_size)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        n_mod = {"adaln_zero": 6, "adaln": 4}.get(block)
        if n_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mod * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope=None) -> torch.Tensor:
        if self.block == "adaln_zero":
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.block == "adaln":
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
            return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + self.attn(self.norm1(x), rope)
        if self.block == "cross_attn":
            x = x + self.cross_attn(self.norm_cross(x), c)  # c: (N, 2, D)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, modulated: bool, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        x = self.norm_final(x)
        if c is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)  # (N, T, p*p*C_out)



def init_backbone(model: nn.Module) -> None:
    """The official code's first steps, shared by DiT and MMDiT (in this order, so a seed gives
    the official weights): Xavier-uniform Linears with zero biases, the fixed sin-cos table, and
    the patch embedding initialised like a Linear on flattened patches."""

    def _basic_init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    model.apply(_basic_init)
    if hasattr(model, "pos_embed"):  # over an image's patches, or a clip's tubelets (a text-to-video MMDiT)
        c = model.config
        video = len(c.sample_shape) == 4
        table = get_3d_sincos_pos_embed(c.hidden_size, c.grid) if video else get_2d_sincos_pos_embed(c.hidden_size, int(model.num_patches**0.5))
        model.pos_embed.data.copy_(torch.from_numpy(table).float()[None])
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)

class DiT(nn.Module):
    """Diffusion Transformer. `forward(x, t, y)` -> (N, C or 2C, H, W); y == num_classes is null."""

    def __init__(self, config: DiTConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = DiTConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        self.config = config
        c = config
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        self.patch_size, self.num_heads, self.num_classes = c.patch_size, c.num_heads, c.num_classes
        self.grad_checkpointing = False  # recompute block activations in backward (set by the trainer)

        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        if c.cfg_embed:  # absent otherwise, so the official state-dict keys stay as they are
            self.w_embedder = TimestepEmbedder(c.hidden_size)
        if c.time_inputs == 2:  # MeanFlow's interval length; absent otherwise, as w_embedder
            self.h_embedder = TimestepEmbedder(c.hidden_size)
        self.num_patches = (c.input_size // c.patch_size) ** 2
        if "sincos" in c.pos_embed:  # fixed sin-cos table, a frozen parameter so official checkpoints carry it
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, c.hidden_size), requires_grad=False)
        if "rope" in c.pos_embed:  # 2-D rotary angles of the token grid, rebuilt (not saved) on load
            cos, sin = rope_2d(c.input_size // c.patch_size, c.hidden_size // c.num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels, c.block.startswith("adaln"), c.norm)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiT:
        return cls(DiTConfig.from_preset(name, **overrides))

    def initialize_weights(self) -> None:
        """Initialisation of the official code; adaLN-Zero's zeros written out."""
        init_backbone(self)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.config.time_inputs == 2:  # as t_embedder (MeanFlow's official init)
            nn.init.normal_(self.h_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.h_embedder.mlp[2].weight, std=0.02)
        if self.config.cfg_embed:  # a zero last layer: the student starts as the teacher it is made from
            nn.init.normal_(self.w_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.w_embedder.mlp[2].weight)
            nn.init.zeros_(self.w_embedder.mlp[2].bias)
        if self.config.block == "adaln_zero":
            for block in self.blocks:  # every residual branch starts as the identity
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.config.block.startswith("adaln"):
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)  # the first prediction is exactly zero
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: torch.Tensor | float | None = None,
                r: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """x: (N, C, H, W) noisy input; t: (N,) timesteps; y: (N,) labels, num_classes = null;
        cfg_scale: (N,) or a number, for cfg_embed models only (default 1: no guidance);
        r: (N,) the interval's other end, for time_inputs=2 models only (default t: the velocity at t)."""
        x = self.x_embedder(x)  # (N, T, D)
        if hasattr(self, "pos_embed"):
            x = x + self.pos_embed
        rope = (self.rope_cos, self.rope_sin) if hasattr(self, "rope_cos") else None
        t_emb = self.t_embedder(t)  # (N, D)
        if hasattr(self, "w_embedder"):
            w = torch.as_tensor(1.0 if cfg_scale is None else cfg_scale, dtype=torch.float32, device=t.device)
            t_emb = t_emb + self.w_embedder(w.expand(t.shape[0]))  # (N, D)
        elif cfg_scale is not None:
            raise ValueError("this DiT does not take the guidance scale as an input (cfg_embed is off); guide it with ditkit.sample(cfg_scale=...) instead.")
        if hasattr(self, "h_embedder"):
            t_emb = t_emb + self.h_embedder(torch.zeros_like(t) if r is None else r - t)  # (N, D)
        elif r is not None:
            raise ValueError("this DiT takes one time (time_inputs is 1), not the interval (t, r) of a MeanFlow model; call it without r.")
        y_emb = self.y_embedder(y)  # (N, D)
        block = self.config.block
        if block.startswith("adaln"):
            c = t_emb + y_emb  # (N, D)
        else:
            c = torch.stack([t_emb, y_emb], dim=1)  # (N, 2, D)
            if block == "in_context":
                x = torch.cat([c, x], dim=1)  # (N, 2 + T, D)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, c, rope, use_reentrant=False)
            else:
                x = blk(x, c, rope)
        if block == "in_context":
            x = x[:, 2:]  # drop the conditioning tokens before decoding
        x = self.final_layer(x, c if block.startswith("adaln") else None)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)
