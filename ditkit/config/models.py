"""Configs of the networks: DiT (the paper's, with the modern options), MMDiT (text to image), the
video DiT, U-ViT and the U-Net baseline. DiT, MMDiT and the video DiT share their size fields
(`TransformerConfig`) and the presets; U-ViT keeps the official U-ViT's own names."""

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
    TEXT_MAX_LENGTH,
    UVIT_PRESETS,
    UVIT_SIZES,
    VIDEO_MMDIT_PRESETS,
    VIDEO_PRESETS,
    Config,
    nonnegative,
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

    @property
    def num_real_classes(self) -> int:
        """The class ids a caller may ask for: 0 .. num_real_classes - 1."""
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

    # The fields a network's size grows with, in the order a too-large one is looked for.
    SIZE_FIELDS = ("depth", "hidden_size", "mlp_ratio", "input_size", "patch_size", "num_classes", "in_channels", "context_dim", "pooled_dim")

    def footprint(self, **override) -> tuple[float, float]:
        """(parameters, floats of one image's activations in a forward pass), roughly, with any
        field overridden: enough to refuse a network no machine holds before it is built."""
        v = {**{f.name: getattr(self, f.name) for f in fields(self)}, **override}
        h, tokens = v["hidden_size"], (v["input_size"] // v["patch_size"]) ** 2
        streams = 2 if getattr(self, "conditioning", "class") == "text" else 1  # an MMDiT's blocks hold an image and a text stream
        per_block = (4 + 2 * v["mlp_ratio"] + 6) * h * h  # attention, MLP, adaLN regression
        tables = v.get("num_classes", 0) + tokens + 2 * v["patch_size"] ** 2 * v["in_channels"] + v.get("context_dim", 0) + v.get("pooled_dim", 0)
        params = v["depth"] * streams * per_block + (tables + 256 + h) * h
        activations = tokens * h * (6 + 2 * v["mlp_ratio"]) + v["num_heads"] * tokens**2  # + the attention maps
        return float(params), float(activations)

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

    @classmethod
    def from_tubelet_preset(cls, name: str, prefix: str, presets: tuple[str, ...], overrides: dict):
        """`cls` at a size and patch over tubelets of some frames ("VDiT-S/4x2": DiT-S/4 over 2-frame tubelets)."""
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}.")
        size_patch, _, tubelet = name.rpartition("x")
        return cls.from_size_preset(size_patch, prefix, presets, {**overrides, "tubelet": int(tubelet)}, prefix_required=True)


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
    mlp_conv: bool = field(default=False, metadata=option("a depthwise 3x3 convolution over the token grid inside each block's MLP, zero-initialised beside the identity (PVTv2's, U-DiT's locality)"))

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
    # MeanFlow (`--objective meanflow`): a second time, the end r of the interval the network averages the velocity over.
    time_inputs: int = field(default=1, metadata=option("times the network takes: 1 (t), or 2 (t and r, embedded as r - t: MeanFlow's average velocity)", choices=(1, 2)))

    def check(self) -> None:
        TransformerConfig.check(self)
        if self.cfg_embed != bool(self.cfg_range):
            raise ValueError("a model that takes the guidance scale as input (cfg_embed) needs cfg_range LO <= HI, the scales it was trained on, and other models none.")
        if "rope" in self.pos_embed and self.block == "in_context":
            raise ValueError("2-D RoPE rotates a grid of image tokens; in_context blocks prepend other tokens, so use --pos-embed sincos with them.")
        if "rope" in self.pos_embed and (self.hidden_size // max(self.num_heads, 1)) % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4; hidden {self.hidden_size} over {self.num_heads} heads is not.")
        if self.mlp_conv and self.block == "in_context":
            raise ValueError("--mlp-conv convolves a grid of image tokens; in_context blocks prepend other tokens, so use another --block with it.")

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

    SIZE_FIELDS = TransformerConfig.SIZE_FIELDS + ("frames",)

    def footprint(self, **override) -> tuple[float, float]:
        """A clip's: the DiT's parameters, and activations of a token per tubelet with the attention
        maps of the widest block (joint: all tokens; factorized: a frame or a position's frames;
        windowed: a window of token frames)."""
        v = {**{f.name: getattr(self, f.name) for f in fields(self)}, **override}
        params, _ = super().footprint(**override)
        steps, side = max(v["frames"] // v["tubelet"], 1), (v["input_size"] // v["patch_size"]) ** 2
        keys = {"joint": steps * side, "factorized": max(side, steps), "windowed": min(v["window"], steps) * side}[v["attention"]]
        return params, float(steps * side * (v["hidden_size"] * (6 + 2 * v["mlp_ratio"]) + v["num_heads"] * keys))

    def check(self) -> None:
        TransformerConfig.check(self)
        if self.frames % self.tubelet:
            raise ValueError(f"{self.frames} frames do not split into tubelets of {self.tubelet}; use a frame count that is a multiple of {self.tubelet}.")
        if self.block == "in_context" or self.cfg_embed or self.cfg_range or self.time_inputs != 1:
            raise ValueError("video DiTs take the paper's adaLN-Zero, adaLN or cross-attention blocks with one time input and without cfg_embed; pick one of those.")
        if self.mlp_conv:
            raise ValueError("--mlp-conv convolves an image's token grid, not a clip's; drop it for video models.")
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
        return VideoDiTConfig.from_tubelet_preset(name, "VDiT-", VIDEO_PRESETS, overrides)


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
    kind = "text-to-image"  # what the model is called in messages
    sample_shape = DataShape.sample_shape

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @staticmethod
    def from_preset(name: str, **overrides) -> MMDiTConfig:
        """"MMDiT-S/2", ... (the DiT sizes) with any field overridden; None values are ignored."""
        return MMDiTConfig.from_size_preset(name, "MMDiT-", MMDIT_PRESETS, overrides, prefix_required=True)


@dataclass(frozen=True)
class VideoMMDiTConfig(MMDiTConfig):
    """A text-to-video MMDiT: the MMDiT's two streams and joint attention, over the video DiT's
    tubelets of `tubelet` frames x patch x patch and its 3-D sin-cos positions. Every block attends
    over the prompt's tokens and all spacetime tokens together (the joint arrangement)."""

    frames: int = field(default=16, metadata=positive("frames per clip"))
    tubelet: int = field(default=1, metadata=positive("frames per token (the tubelet's depth)"))

    SIZE_FIELDS = TransformerConfig.SIZE_FIELDS + ("frames",)
    kind = "text-to-video"
    sample_shape = VideoDiTConfig.sample_shape
    grid = VideoDiTConfig.grid

    def footprint(self, **override) -> tuple[float, float]:
        """A clip's: the MMDiT's parameters, and activations of every spacetime token attending to all."""
        v = {**{f.name: getattr(self, f.name) for f in fields(self)}, **override}
        params, _ = super().footprint(**override)
        tokens = max(v["frames"] // v["tubelet"], 1) * (v["input_size"] // v["patch_size"]) ** 2
        return params, float(tokens * (v["hidden_size"] * (6 + 2 * v["mlp_ratio"]) + v["num_heads"] * tokens))

    def check(self) -> None:
        TransformerConfig.check(self)
        if self.frames % self.tubelet:
            raise ValueError(f"{self.frames} frames do not split into tubelets of {self.tubelet}; use a frame count that is a multiple of {self.tubelet}.")
        if self.hidden_size % 2 or min(axis_split(self.hidden_size)) <= 0:
            raise ValueError(f"3-D sin-cos positions split the width over frames, rows and columns; hidden {self.hidden_size} must be even and at least 6.")

    @staticmethod
    def from_preset(name: str, **overrides) -> VideoMMDiTConfig:
        """"MMDiT-S/4x2" (MMDiT-S/4 over 2-frame tubelets), ... with any field overridden; None values are ignored."""
        return VideoMMDiTConfig.from_tubelet_preset(name, "MMDiT-", VIDEO_MMDIT_PRESETS, overrides)


@dataclass(frozen=True)
class TextEncoderRecord(Config):
    """What a text-to-image model records of its text encoder (config.json's "text_encoder")."""

    name: str = field(metadata=option("Hugging Face text encoder folder or hub id"))
    max_length: int = field(default=TEXT_MAX_LENGTH, metadata=positive("tokens per prompt; longer ones are cut"))


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


@dataclass(frozen=True)
class UViTConfig(Config):
    """Hyper-parameters of a U-ViT (Bao et al. 2023). Names and defaults are the official
    `UViT.__init__`'s (its `norm_layer` is always nn.LayerNorm), plus `class_dropout_prob`, which the
    official code keeps in its dataset config as `p_uncond`.

    Labels: with num_classes <= 0 the network is unconditional and takes no y. Otherwise y indexes
    a table of num_classes rows; a model trained with label dropout (class_dropout_prob > 0, the
    ImageNet 256 and 512 models: num_classes=1001, p_uncond 0.1 or 0.15) reserves the last row,
    num_classes - 1, for "no class", the label classifier-free guidance runs the unconditional
    branch with. The ImageNet 64 models (num_classes=1000, no dropout) have no null class.
    """

    img_size: int = field(default=224, metadata=positive("image (or latent) side"))
    patch_size: int = field(default=16, metadata=positive("patch size"))
    in_chans: int = field(default=3, metadata=positive("input channels"))
    embed_dim: int = field(default=768, metadata=positive("token width"))
    depth: int = field(default=12, metadata=nonnegative("in- and out-blocks around the mid block"))
    num_heads: int = field(default=12, metadata=positive("attention heads"))
    mlp_ratio: float = field(default=4.0, metadata=positive("MLP width / token width"))
    qkv_bias: bool = field(default=False, metadata=option("bias on the qkv projection"))
    # Recorded but not applied, as in the official code on PyTorch >= 2 (its SDPA and xformers
    # attention paths use 1/sqrt(head_dim); only its fallback path read qk_scale). Released models: None.
    qk_scale: float | None = field(default=None, metadata=positive("attention scale (recorded, not applied, as officially)"))
    mlp_time_embed: bool = field(default=False, metadata=option("an MLP on the time sinusoid (else the sinusoid is the time token)"))
    num_classes: int = field(default=-1, metadata=option("label table rows, the null class included (<= 0: unconditional)"))
    use_checkpoint: bool = field(default=False, metadata=option("recompute block activations in backward"))
    conv: bool = field(default=True, metadata=option("a 3x3 convolution on the output"))
    skip: bool = field(default=True, metadata=option("long skips from the in-blocks to the out-blocks"))
    class_dropout_prob: float = field(default=0.1, metadata=option("label dropout in training (the last class is then the null class)", ge=0, lt=1))

    conditioning = "class"
    SIZE_FIELDS = ("depth", "embed_dim", "mlp_ratio", "img_size", "patch_size", "num_classes", "in_chans")

    def footprint(self, **override) -> tuple[float, float]:
        """(parameters, floats of one image's activations in a forward pass), roughly, with any field
        overridden: enough to refuse a network no machine holds before it is built."""
        v = {**{f.name: getattr(self, f.name) for f in fields(self)}, **override}
        d, tokens = v["embed_dim"], (v["img_size"] // v["patch_size"]) ** 2 + 2
        per_block = (4 + 2 * v["mlp_ratio"]) * d * d  # attention, MLP (the out-blocks' skip_linear: 2 d^2 more)
        params = (v["depth"] + 1) * per_block + v["depth"] * d * d + (max(v["num_classes"], 0) + tokens + 2 * v["patch_size"] ** 2 * v["in_chans"]) * d
        return float(params), float(tokens * d * (6 + 2 * v["mlp_ratio"]) + v["num_heads"] * tokens**2)

    def check(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}; "
                             f"use an img_size that is a multiple of {self.patch_size}, so the patches tile the image.")  # fmt: skip
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; choose a head count that divides it.")
        if int(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(f"U-ViT mlp_ratio {self.mlp_ratio} gives an MLP less than 1 wide; use a larger ratio.")
        if self.num_classes == 1 and self.class_dropout_prob > 0:
            raise ValueError("a U-ViT with label dropout spends its last class on the null label, so num_classes=1 "
                             "leaves no real class; use num_classes = classes + 1, or class_dropout_prob=0.")  # fmt: skip

    @staticmethod
    def from_preset(name: str, **overrides) -> UViTConfig:
        """One of the paper's sizes with a patch size ("U-ViT-H/2", "U-ViT-S-Deep/4"); any field
        may be overridden, and the data fields (img_size, in_chans, num_classes, conv) usually are."""
        size, _, patch = name.removeprefix("U-ViT-").partition("/")
        if not name.startswith("U-ViT-") or size not in UVIT_SIZES or patch not in ("2", "4", "8"):
            raise ValueError(f"unknown U-ViT preset {name!r}; choose one of {', '.join(UVIT_PRESETS)}.")
        known = {f.name for f in fields(UViTConfig)}
        if set(overrides) - known:
            raise ValueError(f"unknown U-ViT config field(s) {sorted(set(overrides) - known)}; known: {sorted(known)}.")
        depth, embed_dim, num_heads = UVIT_SIZES[size]
        return UViTConfig(**{"depth": depth, "embed_dim": embed_dim, "num_heads": num_heads, "patch_size": int(patch), **overrides})

    # What the trainer, the samplers and the commands read off a network config (DataShape's names).
    @property
    def input_size(self) -> int:
        """Side of the (latent or pixel) image the network takes."""
        return self.img_size

    @property
    def in_channels(self) -> int:
        return self.in_chans

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.in_chans, self.img_size, self.img_size)

    @property
    def hidden_size(self) -> int:
        return self.embed_dim

    @property
    def learn_sigma(self) -> bool:
        return False  # every U-ViT predicts the noise (or the velocity) only

    @property
    def out_channels(self) -> int:
        return self.in_chans

    @property
    def conditional(self) -> bool:
        """Whether forward takes labels (a label token and its embedding table)."""
        return self.num_classes > 0

    @property
    def null_class(self) -> int | None:
        """The label meaning "no class" (the last table row), or None where training dropped no labels."""
        return self.num_classes - 1 if self.conditional and self.class_dropout_prob > 0 else None

    @property
    def num_real_classes(self) -> int:
        """The class ids a caller may ask for, 0 .. num_real_classes - 1: the table less the null row.
        An unconditional U-ViT samples one "class", 0, which the pipeline does not pass to it."""
        if not self.conditional:
            return 1
        return self.num_classes - (self.null_class is not None)

    @property
    def num_blocks(self) -> int:
        """Transformer blocks in the network: depth // 2 in, one mid, depth // 2 out."""
        return 2 * (self.depth // 2) + 1
