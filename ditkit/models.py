"""The Diffusion Transformer of Peebles & Xie (2023), read top to bottom.

State-dict keys and shapes equal the official release, so its checkpoints load with
strict=True. The model knows nothing of losses, guidance or distribution: forward(x, t, y).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCKS = ("adaln_zero", "adaln", "cross_attn", "in_context")

# name -> (depth, hidden_size, num_heads); patch size comes from the "/p" suffix.
PRESET_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PRESETS = tuple(f"DiT-{size}/{p}" for size in PRESET_SIZES for p in (2, 4, 8))


class DataShape:
    """What the trainer and the samplers read off any network config (a DiT's, the U-Net's)."""

    in_channels: int
    num_classes: int
    learn_sigma: bool

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.num_classes


@dataclass(frozen=True)
class DiTConfig(DataShape):
    """Hyper-parameters of a DiT; names follow the official `DiT.__init__`."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    block: str = "adaln_zero"

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block {self.block!r} is not one of {', '.join(BLOCKS)}; pick one of those.")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input size {self.input_size} is not divisible by patch size {self.patch_size}; "
                f"use an input size that is a multiple of {self.patch_size}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads; "
                "choose a head count that divides it."
            )
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {self.class_dropout_prob}.")

    @staticmethod
    def from_preset(name: str, **overrides) -> "DiTConfig":
        """One of the paper's 12 configs ("DiT-XL/2", ...) with any field overridden."""
        key = name.removeprefix("DiT-")
        size, _, patch = key.partition("/")
        if size not in PRESET_SIZES or patch not in ("2", "4", "8"):
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
        depth, hidden, heads = PRESET_SIZES[size]
        base = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
        known = {f.name for f in fields(DiTConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown DiT config field(s) {sorted(unknown)}; known: {sorted(known)}.")
        return DiTConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first as in ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null label, used for label dropout and CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)  # (N, D)


class PatchEmbed(nn.Module):
    """p x p patches to tokens with a strided conv (timm's PatchEmbed, same keys)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA (flash / memory-efficient kernels on GPU)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))  # (N, T, D)


class CrossAttention(nn.Module):
    """Tokens attend over a short conditioning sequence (the t and y tokens)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        H = self.num_heads
        q = self.q(x).reshape(N, T, H, D // H).transpose(1, 2)  # (N, H, T, D/H)
        k, v = self.kv(cond).reshape(N, cond.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    """One transformer block in any of the paper's four conditioning designs.

    adaln_zero: shift, scale and a residual gate per branch regressed from c (gates start at 0).
    adaln: shift and scale only.  cross_attn: c as two tokens attended after self-attention.
    in_context: c already sits in the sequence as tokens, so the block is a plain ViT block.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, block: str):
        super().__init__()
        self.block = block
        self.norm1 = _norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = _norm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if block == "cross_attn":
            self.norm_cross = _norm(hidden_size)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        n_mod = {"adaln_zero": 6, "adaln": 4}.get(block)
        if n_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mod * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.block == "adaln_zero":
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.block == "adaln":
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + self.attn(self.norm1(x))
        if self.block == "cross_attn":
            x = x + self.cross_attn(self.norm_cross(x), c)  # c: (N, 2, D)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, modulated: bool):
        super().__init__()
        self.norm_final = _norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        x = self.norm_final(x)
        if c is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)  # (N, T, p*p*C_out)


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
        self.num_patches = (c.input_size // c.patch_size) ** 2
        # Fixed sin-cos embedding, a frozen parameter so official checkpoints carry it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, c.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.block) for _ in range(c.depth))
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels, c.block.startswith("adaln"))
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiT":
        return cls(DiTConfig.from_preset(name, **overrides))

    def initialize_weights(self) -> None:
        """Initialisation of the official code; adaLN-Zero's zeros written out."""

        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        grid = int(self.num_patches**0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.config.hidden_size, grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear on flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) noisy input; t: (N,) timesteps; y: (N,) labels, num_classes = null."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t_emb = self.t_embedder(t)  # (N, D)
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
                x = checkpoint(blk, x, c, use_reentrant=False)
            else:
                x = blk(x, c)
        if block == "in_context":
            x = x[:, 2:]  # drop the conditioning tokens before decoding
        x = self.final_layer(x, c if block.startswith("adaln") else None)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) sin-cos embedding, MAE's layout (half for rows, half for columns)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def config_dict(model: DiT) -> dict:
    return asdict(model.config)
