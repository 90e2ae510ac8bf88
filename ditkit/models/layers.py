"""Building blocks of the transformers: embedders, attention, MLP, norms, position tables."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import axis_split


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


class TubeletEmbed(nn.Module):
    """t x p x p tubelets of a clip to tokens with a strided 3-D conv (Sora's spacetime patches)."""

    def __init__(self, tubelet: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        size = (tubelet, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=size, stride=size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, T, H, W) -> (N, T' * H' * W', D), frame-major


# PyTorch's CPU flash-attention kernel is quick forward but slow backward in bf16 and fp16: at 64
# tokens its forward + backward takes 4x the math form's, 40% of a bf16 DiT-S/4 training step
# (bench/attention_cpu.py). Up to this many keys the math form trains faster on a CPU, eager or
# compiled; at 256 SDPA is faster again.
CPU_MATH_ATTENTION_MAX_KEYS = 192


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (N, H, T, d) heads; `mask` (bool, True = attend) broadcasts
    to (N, H, T, S). SDPA, but for a CPU backward in half precision over few keys (see above)."""
    if (q.requires_grad and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and k.shape[-2] <= CPU_MATH_ATTENTION_MAX_KEYS):  # fmt: skip
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        # A bf16 softmax is twice as fast eagerly; under torch.compile the float32 one fuses better.
        probs = scores.softmax(-1, dtype=torch.float32 if torch.compiler.is_compiling() else None)
        return probs.to(v.dtype) @ v  # (N, H, T, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class HeadNorm(nn.RMSNorm):
    """RMSNorm of each head's queries or keys (QK-norm), computed in float32 and returned in the
    input's dtype: the numbers torch gives a bf16 input with a float32 weight under autocast, without
    the warning it prints on every such forward (its fused kernel wants a single dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA (flash / memory-efficient kernels on GPU), with
    optional QK-norm (RMSNorm of each head's queries and keys, SD3) and 2-D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        if qk_norm:
            self.q_norm = HeadNorm(dim // num_heads, eps=1e-6)
            self.k_norm = HeadNorm(dim // num_heads, eps=1e-6)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """How RoPE's angles turn q or k: by rows and columns (a video attention's: by three axes)."""
        return apply_rope_2d(x, cos, sin)

    def heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of the tokens (N, T, D), each (N, H, T, D/H), QK-normed and turned by RoPE where set."""
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, D/H)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self.rotate(q, *rope), self.rotate(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        N, T, D = x.shape
        x = attention(*self.heads(x, rope))  # (N, H, T, D/H)
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
        x = attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class TokenConv(nn.Module):
    """h + depthwise3x3(h) over the square grid of a row-major token sequence (N, T, C): the locality
    PVTv2's and U-DiT's MLPs add to a ViT. Zero-initialised, so a block starts as it would without it
    (and weights trained without it load into it with load_state_dict(strict=False), its zeros kept)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        N, T, C = h.shape
        g = math.isqrt(T)
        # Channels-last views, not a transpose to (N, C, g, g): a compiled CPU training step ran about 20% faster so.
        grid = h.reshape(N, g, g, C).permute(0, 3, 1, 2)  # (N, C, g, g), channels-last in memory
        return h + self.conv(grid).permute(0, 2, 3, 1).reshape(N, T, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, conv: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        if conv:
            self.conv = TokenConv(hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (N, T, hidden)
        if hasattr(self, "conv"):
            h = self.conv(h)
        return self.fc2(self.act(h))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020): silu(x W1) * (x W2) W3; `hidden` is the width of one gate."""

    def __init__(self, dim: int, hidden: int, conv: bool = False):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        if conv:  # on the gate only (TransNeXt's ConvGLU): half the channels of convolving both
            self.conv = TokenConv(hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)  # each (N, T, hidden)
        if hasattr(self, "conv"):
            a = self.conv(a)
        return self.w3(F.silu(a) * b)


def make_mlp(kind: str, dim: int, mlp_ratio: float, conv: bool = False) -> nn.Module:
    """The block MLP: GELU (tanh) as the paper, or SwiGLU at 2/3 the width (about the same parameters);
    `conv` adds a depthwise 3x3 convolution over the token grid to its hidden features (TokenConv)."""
    hidden = int(dim * mlp_ratio)
    return Mlp(dim, hidden, conv) if kind == "gelu" else SwiGLU(dim, int(2 * hidden / 3), conv)


def make_norm(kind: str, dim: int) -> nn.Module:
    """The pre-norm of a block, without affine parameters (adaLN supplies scale and shift)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def rope_2d(grid_size: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, head_dim), of axial 2-D rotary embeddings on a grid_size^2 token grid
    (row-major, as PatchEmbed flattens): the first half of each head turns with the row, the
    second half with the column, each half split into rotated pairs (i, i + d/4)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}; change hidden size or heads.")
    quarter = head_dim // 4
    inv = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (d/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = pos.repeat_interleave(grid_size), pos.repeat(grid_size)  # (T,) each
    angles = torch.stack([rows[:, None] * inv, cols[:, None] * inv], dim=1)  # (T, 2 axes, d/4)
    angles = angles[:, :, None, :].expand(-1, 2, 2, quarter).reshape(len(rows), head_dim)  # (T, d): axis, half, pair
    return angles.cos().float(), angles.sin().float()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, H, T, d) queries or keys by the angles of `rope_2d`."""
    d = x.shape[-1]
    parts = x.unflatten(-1, (2, 2, d // 4))  # (N, H, T, axis, half, d/4)
    x1, x2 = parts[..., 0, :], parts[..., 1, :]
    rotated = torch.stack([-x2, x1], dim=-2).flatten(-3)  # (N, H, T, d)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


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


def grid_positions(grid: tuple[int, ...]) -> np.ndarray:
    """(L, len(grid)) float64 coordinates of a token grid in flatten order (the first axis slowest)."""
    return np.stack([a.reshape(-1) for a in np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid), indexing="ij")], axis=1)


def get_3d_sincos_pos_embed(embed_dim: int, grid: tuple[int, int, int]) -> np.ndarray:
    """(T * H * W, embed_dim) sin-cos embedding of a (frames, rows, columns) token grid, the width
    split over the three axes by `axis_split`, each part MAE's 1-D table of that coordinate."""
    pos = grid_positions(grid)
    return np.concatenate([_1d_sincos(d, pos[:, a]) for a, d in enumerate(axis_split(embed_dim))], axis=1)


def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, head_dim), of axial 3-D rotary embeddings (CogVideoX) on a (frames, rows,
    columns) token grid: each head is split over the axes by `axis_split`, and each axis's part into
    pairs (i, i + part/2) that turn with that coordinate."""
    pos = grid_positions(grid)
    parts = []
    for a, d in enumerate(axis_split(head_dim)):
        inv = 1.0 / theta ** (np.arange(d // 2, dtype=np.float64) / (d // 2))  # (d/2,)
        angles = pos[:, a : a + 1] * inv  # (L, d/2)
        parts += [angles, angles]  # the pair's two members turn together
    angles = np.concatenate(parts, axis=1)  # (L, head_dim)
    # torch.tensor (not from_numpy) follows a default-device context, as the model's other tensors do.
    return torch.tensor(np.cos(angles), dtype=torch.float32), torch.tensor(np.sin(angles), dtype=torch.float32)


def apply_rope_axes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, H, L, d) queries or keys by the angles of `rope_3d`: in each axis's part, pairs (i, i + part/2)."""
    rotated = []
    for part in x.split(axis_split(x.shape[-1]), dim=-1):
        x1, x2 = part.chunk(2, dim=-1)
        rotated += [-x2, x1]
    return x * cos.to(x.dtype) + torch.cat(rotated, dim=-1) * sin.to(x.dtype)
