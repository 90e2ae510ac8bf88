"""Configs of the networks: DiT (the paper's, with the modern options), MMDiT (text to image), the
video DiT and the U-Net baseline. The transformers share their size fields (`TransformerConfig`) and
the presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .base import (
    ATTENTIONS,
    BLOCK_ALIASES,
    BLOCKS,
    MLPS,
    MMDIT_PRESETS,
    NORMS,
    POS_EMBEDS,
    PRESET_SIZES,
    PRESETS,
    VIDEO_PRESETS,
    Config,
    option,
    positive,
)


class DataShape:
    """What the trainer and the samplers read off any network config (a DiT's, the U-Net's)."""

    input_size: int
    in_channels: int
    num_classes: int
    learn_sigma: bool
    conditioning = "class"  # what forward's third argument is: class ids ("class") or encoded prompts ("text")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample as the network takes it: (C, H, W), or (C, T, H, W) for a video network."""
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.num_classes


@dataclass(frozen=True)
class TransformerConfig(Config):
    """The size of a patch transformer (DiT, MMDiT): names follow the official `DiT.__init__`."""

    input_size: int = field(default=32, metadata=positive("input size (latent or pixels)"))
    patch_size: int = field(default=2, metadata=positive("patch size"))
    in_channels: int = field(default=4, metadata=positive("input channels"))
    hidden_size: int = field(default=1152, metadata=positive("hidden size"))
    depth: int = field(default=28, metadata=positive("number of blocks"))
    num_heads: int = field(default=16, metadata=positive("attention heads"))
    mlp_ratio: float = field(default=4.0, metadata=positive("MLP width / hidden size"))

    def check(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input size {self.input_size} is not divisible by patch size {self.patch_size}; "
                f"use an input size that is a multiple of {self.patch_size}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads; choose a head count that divides it.")

    @classmethod
    def from_size_preset(cls, name: str, prefix: str, presets: tuple[str, ...], overrides: dict, prefix_required: bool = False):
        """`cls` at one of the paper's sizes and patches ("DiT-XL/2", "MMDiT-S/4"; a DiT's prefix may be
        left out) with any field overridden; None values are ignored."""
        size, _, patch = name.removeprefix(prefix).partition("/")
        if (prefix_required and not name.startswith(prefix)) or size not in PRESET_SIZES or patch not in ("2", "4", "8"):
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}.")
        depth, hidden, heads = PRESET_SIZES[size]
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown {prefix.rstrip('-')} config field(s) {sorted(unknown)}; known: {sorted(known)}.")
        base = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(frozen=True)
class DiTDesign(Config):
    """A DiT's design beyond its size: the paper's by default (adaLN-Zero blocks, 4x GELU MLPs,
    LayerNorm, sin-cos positions), or the modern options (LightningDiT, SD3). Part of every
    DiTConfig, and the design flags of ditkit train."""

    block: str = field(default="adaln_zero", metadata=option("conditioning design", choices=BLOCKS + tuple(BLOCK_ALIASES)))
    mlp: str = field(default="gelu", metadata=option("block MLP: gelu (the paper) or swiglu (2/3 width, same parameters)", choices=MLPS))
    norm: str = field(default="layernorm", metadata=option("block norm: layernorm (the paper) or rmsnorm", choices=NORMS))
    qk_norm: bool = field(default=False, metadata=option("RMSNorm on each head's queries and keys (SD3)"))
    pos_embed: str = field(default="sincos", metadata=option("positions: the sin-cos table (the paper), 2-D rope, or both", choices=POS_EMBEDS))

    def __post_init__(self):
        object.__setattr__(self, "block", BLOCK_ALIASES.get(self.block, self.block))  # the paper's spellings too
        super().__post_init__()


@dataclass(frozen=True)
class DiTConfig(DiTDesign, TransformerConfig, DataShape):
    """Hyper-parameters of a DiT; names follow the official `DiT.__init__`."""

    class_dropout_prob: float = field(default=0.1, metadata=option("label dropout", ge=0, lt=1))
    num_classes: int = field(default=1000, metadata=positive("number of classes"))
    learn_sigma: bool = field(default=True, metadata=option("output the variance too"))
    # Guidance distillation (`ditkit distill --method guidance`): the guidance scale is an input, embedded like t.
    cfg_embed: bool = field(default=False, metadata=option("take the guidance scale as an input (one pass per step instead of two)"))
    cfg_range: tuple[float, ...] = field(default=(), metadata=option("the guidance scales LO HI a cfg_embed model was trained on", ge=0, interval=True))

    def check(self) -> None:
        TransformerConfig.check(self)
        if self.cfg_embed != bool(self.cfg_range):
            raise ValueError("a model that takes the guidance scale as input (cfg_embed) needs cfg_range LO <= HI, the scales it was trained on, and other models none.")
        if "rope" in self.pos_embed and self.block == "in_context":
            raise ValueError("2-D RoPE rotates a grid of image tokens; in_context blocks prepend other tokens, so use --pos-embed sincos with them.")
        if "rope" in self.pos_embed and (self.hidden_size // max(self.num_heads, 1)) % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4; hidden {self.hidden_size} over {self.num_heads} heads is not.")

    @staticmethod
    def from_preset(name: str, **overrides) -> DiTConfig:
        """One of the paper's 12 configs ("DiT-XL/2", ...) with any field overridden."""
        return DiTConfig.from_size_preset(name, "DiT-", PRESETS, overrides)


def axis_split(width: int) -> tuple[int, int, int]:
    """How a width splits over (frame, row, column) for 3-D positions, each part even: rows and
    columns 3/8 each and frames the rest (CogVideoX's 2:3:3), e.g. 64 -> (16, 24, 24)."""
    spatial = 2 * (3 * width // 16)
    return width - 2 * spatial, spatial, spatial


@dataclass(frozen=True)
class VideoDesign(Config):
    """How a video DiT's attention covers its spacetime tokens. joint: every block attends over all
    tokens of all frames (its cost grows with the square of frames x patches); factorized: Latte's
    best arrangement, blocks alternating between attention within each frame (spatial) and across
    frames at each position (temporal); windowed: every block attends within `window` consecutive
    token frames, odd blocks over windows shifted by half of one (Swin's shift, in time)."""

    attention: str = field(default="joint", metadata=option("video models: joint, factorized (spatial and temporal blocks in turn) or windowed", choices=ATTENTIONS))
    window: int = field(default=4, metadata=option("video models, windowed attention: token frames (frames / tubelet) per window, even", ge=2))


@dataclass(frozen=True)
class VideoDiTConfig(VideoDesign, DiTConfig):
    """A DiT over clips (N, C, T, H, W): tubelets of `tubelet` frames x patch x patch become tokens
    (Sora's spacetime patches), placed by 3-D sin-cos positions and/or 3-D RoPE, conditioned on
    time and class by the DiT's blocks; `attention` arranges their attention (VideoDesign)."""

    frames: int = field(default=16, metadata=positive("frames per clip"))
    tubelet: int = field(default=1, metadata=positive("frames per token (the tubelet's depth)"))

    def check(self) -> None:
        TransformerConfig.check(self)
        if self.frames % self.tubelet:
            raise ValueError(f"{self.frames} frames do not split into tubelets of {self.tubelet}; use a frame count that is a multiple of {self.tubelet}.")
        if self.block == "in_context" or self.cfg_embed or self.cfg_range:
            raise ValueError("video DiTs take the paper's adaLN-Zero, adaLN or cross-attention blocks without cfg_embed; pick one of those.")
        if self.hidden_size % 2 or (self.hidden_size // self.num_heads) % 2 or min(axis_split(self.hidden_size // self.num_heads)) <= 0:
            raise ValueError(f"3-D positions split the width and each head over frames, rows and columns; hidden {self.hidden_size} over "
                             f"{self.num_heads} heads must give an even head width of at least 6.")  # fmt: skip
        steps = self.frames // self.tubelet
        if self.attention == "windowed" and (self.window % 2 or steps % self.window):
            raise ValueError(f"windowed attention needs an even window that divides the {steps} token frames (frames / tubelet); pass --window with one.")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.frames, self.input_size, self.input_size)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens along (frames, rows, columns)."""
        side = self.input_size // self.patch_size
        return self.frames // self.tubelet, side, side

    @staticmethod
    def from_preset(name: str, **overrides) -> VideoDiTConfig:
        """"VDiT-S/4x2" (DiT-S/4 over 2-frame tubelets), ... with any field overridden; None values are ignored."""
        if name not in VIDEO_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(VIDEO_PRESETS)}.")
        size_patch, _, tubelet = name.rpartition("x")
        return VideoDiTConfig.from_size_preset(size_patch, "VDiT-", VIDEO_PRESETS, {**overrides, "tubelet": int(tubelet)}, prefix_required=True)


@dataclass(frozen=True)
class MMDiTConfig(TransformerConfig):
    """Hyper-parameters of an MMDiT (SD3): image and text tokens in two streams with their own
    weights, one joint attention over both, conditioned on the timestep and the pooled text."""

    hidden_size: int = field(default=384, metadata=positive("hidden size of both streams"))
    depth: int = field(default=12, metadata=positive("number of joint blocks"))
    num_heads: int = field(default=6, metadata=positive("attention heads"))
    context_dim: int = field(default=384, metadata=positive("width of the text encoder's token embeddings"))
    pooled_dim: int = field(default=384, metadata=positive("width of the text encoder's pooled embedding"))
    learn_sigma: bool = field(default=False, metadata=option("also output a variance (flow models ignore it)"))
    prompt_dropout_prob: float = field(default=0.1, metadata=option("share of training prompts replaced by the empty prompt (the null condition)", ge=0, lt=1))

    conditioning = "text"
    sample_shape = DataShape.sample_shape

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @staticmethod
    def from_preset(name: str, **overrides) -> MMDiTConfig:
        """"MMDiT-S/2", ... (the DiT sizes) with any field overridden; None values are ignored."""
        return MMDiTConfig.from_size_preset(name, "MMDiT-", MMDIT_PRESETS, overrides, prefix_required=True)


@dataclass(frozen=True)
class UNetConfig(Config, DataShape):
    """A class-conditional UNet2DModel laid out as ADM's: `levels` resolutions with channel
    multipliers (1, 2, 2, ...), two ResNet blocks per level, self-attention at every level but the
    first and in the middle block, the class embedding added to the time embedding. Data fields
    mirror DiTConfig's, so the Trainer and the samplers treat it as they treat a DiT."""

    input_size: int = field(metadata=positive("input size"))
    in_channels: int = field(metadata=positive("input channels"))
    num_classes: int = field(metadata=positive("number of classes"))
    learn_sigma: bool = True
    class_dropout_prob: float = field(default=0.1, metadata=option("label dropout", ge=0, lt=1))
    base_channels: int = field(default=64, metadata=positive("width of the first level"))
    layers_per_block: int = field(default=2, metadata=positive("ResNet blocks per level"))

    @property
    def levels(self) -> int:
        """Resolutions down to 8 px or 4 px (3 at most): 32 -> 32, 16, 8; 8 -> 8, 4."""
        return max(1, min(3, int(math.log2(self.input_size)) - 1))

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * min(2, 1 + i) for i in range(self.levels))

    @classmethod
    def from_dit(cls, c: DiTConfig, base_channels: int) -> UNetConfig:
        return cls(input_size=c.input_size, in_channels=c.in_channels, num_classes=c.num_classes, learn_sigma=c.learn_sigma,
                   class_dropout_prob=c.class_dropout_prob, base_channels=base_channels)  # fmt: skip


def scaled_sizes(preset: str, width_divisor: int = 1, depth_divisor: int = 1) -> dict[str, int]:
    """depth, hidden_size and num_heads of a preset after the study's divisors."""
    depth, hidden, heads = PRESET_SIZES[preset.removeprefix("DiT-").partition("/")[0]]
    if hidden % (width_divisor * heads):
        raise ValueError(f"--width-divisor {width_divisor} does not divide {preset}'s hidden size {hidden} into {heads} equal heads; "
                         f"use a divisor of {hidden // heads}.")  # fmt: skip
    return {"depth": max(1, round(depth / depth_divisor)), "hidden_size": hidden // width_divisor, "num_heads": heads}
