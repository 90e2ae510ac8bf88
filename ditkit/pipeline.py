"""A checkpoint -> model + objective + sampling settings + VAE (+ text encoder): the one setup behind
`ditkit sample`, `ditkit sample-npz`, `ditkit serve`, the training sample grids and `ditkit study`.

An autoguidance guide (`--guide-ckpt`, or the guide a model folder records in its "sampling") is
loaded beside the model and checked against it: the same objective and condition.

Sampling settings resolve in this order: what the caller gives, what the checkpoint records
(`config.json`'s "sampling", a training checkpoint's "sampling"), and the official defaults of the
objective (DiT's sample.py: DDPM 250 steps, CFG 4; SiT's: dopri5, CFG 4). They are checked once,
when the pipeline is built.

The bottom utilities README examples reach through this module (BUNDLED, BUNDLED_TEXT, load_vae,
decode, save_grid, to_uint8) are the ones in ditkit.utils.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import family, infer_config, load_model, peek_config, read_checkpoint
from .config import (
    MMDIT_PRESETS,
    TEXT_MAX_LENGTH,
    UVIT_PRESETS,
    DiTConfig,
    MMDiTConfig,
    ObjectiveConfig,
    Sampling,
    SamplingOptions,
    UViTConfig,
    samplers_for,
)
from .lora import apply_adapter, read_adapter
from .objectives import FlowMatching, GaussianDiffusion, VPDiffusion, build_objective, objective_name
from .samplers import DEFAULT_SAMPLER, check_guide, check_setup, run_sampling
from .text.encoder import TextEncoder
from .utils.images import save_grid, to_uint8
from .utils.runs import BUNDLED, BUNDLED_TEXT, find_checkpoint
from .utils.devices import resolve_device
from .utils.vae import decode, find_vae, load_vae, vae_factor

__all__ = ["Pipeline", "load_pipeline", "grid_pipeline", "default_sampling", "resolve_sampling",
           "BUNDLED", "BUNDLED_TEXT", "load_vae", "decode", "save_grid", "to_uint8"]  # fmt: skip

# The official sample.py's demo classes (ImageNet): used for 1000-class models when none are given.
IMAGENET_DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
# The official sample.py defaults of DiT and SiT (`sample.py ODE`), used when nothing else says.
OFFICIAL_SAMPLING = {
    "gaussian": {"sampler": "ddpm", "num_sampling_steps": 250, "cfg_scale": 4.0},
    "flow": {"sampler": "dopri5", "num_sampling_steps": 250, "cfg_scale": 4.0},
    "vp": {"sampler": "dpm-solver", "num_sampling_steps": 50, "cfg_scale": 1.0},  # U-ViT's eval.py
    "meanflow": {"sampler": "meanflow", "num_sampling_steps": 1, "cfg_scale": 1.0},  # the paper's: one step, guidance trained in
}
# What a model trained by ditkit records for `ditkit sample` unless its run says otherwise: fast samplers.
FAST_SAMPLING = {"gaussian": ("dpm++2m", 10), "flow": ("heun", 5), "vp": ("dpm-solver", 20), "meanflow": ("meanflow", 1)}


class Unconditional(torch.nn.Module):
    """An unconditional network (an official CIFAR-10 or CelebA U-ViT) as the samplers call every
    network, forward(x, t, y): the placeholder labels are dropped."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None, **kwargs) -> torch.Tensor:
        return self.model(x, t, **kwargs)


@dataclass
class Pipeline:
    """A network with its objective, sampling settings and (for latent models) its VAE."""

    model: torch.nn.Module
    objective: GaussianDiffusion | FlowMatching | VPDiffusion
    sampling: Sampling
    vae: object | None = None
    device: torch.device = torch.device("cpu")
    source: Path | None = None  # the checkpoint it was loaded from
    text_encoder: object | None = None  # a text.TextEncoder for text-to-image models
    lora: Path | None = None  # the LoRA adapter merged into the model's weights
    compile: bool = False  # sample through torch.compile(model), `network`
    guide: torch.nn.Module | None = None  # autoguidance: the weaker model that guides in place of the null condition
    guide_source: Path | None = None

    def describe_source(self) -> str:
        return f"{self.source}" + (f" + LoRA {self.lora}" if self.lora else "")

    def describe_sampling(self) -> str:
        """The sampling settings in words, with the guide when guidance is autoguidance."""
        guided = self.guide is not None and self.sampling.cfg_scale != 1
        return self.sampling.describe() + (f", autoguidance by {self.guide_source}" if guided else "")

    def __post_init__(self):
        network = Unconditional(self.model) if getattr(self.config, "conditional", True) is False else self.model
        self.network = torch.compile(network) if self.compile else network  # what the samplers call
        self.guide_network = torch.compile(self.guide) if self.compile and self.guide is not None else self.guide
        check_setup(self.model, self.objective, self.sampling, self.config.in_channels)  # the one check of these settings
        if self.guide is not None:
            check_guide(self.config, self.guide.config)

    @property
    def config(self) -> DiTConfig | MMDiTConfig | UViTConfig:
        return self.model.config

    def condition(self, prompts: list[str]):
        """The TextCondition of `prompts` for a text-to-image pipeline."""
        if self.text_encoder is None:
            raise ValueError("this is a class-conditional model: it takes class ids (--classes), not prompts; pass --ckpt with a text-to-image model.")
        return self.text_encoder.encode(list(prompts))

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, *self.config.sample_shape, generator=generator, device=self.device)

    def latents(self, y: torch.Tensor, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                progress: bool = False, callback=None) -> torch.Tensor:  # fmt: skip
        """Samples in the model's input space for labels y; noise from `generator` (or the global RNG)
        unless given, and the per-step noise of stochastic samplers from the same source. `callback`
        gets the sampler's {"i": steps left, "x", ...} after every step."""
        noise = self.noise(len(y), generator) if noise is None else noise
        return run_sampling(self.network, self.objective, noise, y.to(self.device), self.sampling, generator=generator,
                            progress=progress, callback=callback, clip_denoised=self.vae is None, guide=self.guide_network)  # fmt: skip

    def images(self, y: torch.Tensor, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               progress: bool = False, callback=None) -> torch.Tensor:  # fmt: skip
        """Images in [-1, 1] (decoded by the VAE for latent models)."""
        z = self.latents(y, noise, generator, progress, callback)
        return decode(self.vae, z) if self.vae is not None else z


def resolve_sampling(opts: SamplingOptions, objective: str, recorded: dict, official: bool) -> Sampling:
    """Flags over what the checkpoint records over the objective's official defaults."""
    base = {**OFFICIAL_SAMPLING[objective], **recorded}
    if base["sampler"] not in samplers_for(objective):  # a recorded sampler of another objective
        base["sampler"] = DEFAULT_SAMPLER[objective]
    pick = lambda name: getattr(opts, name) if getattr(opts, name) is not None else base.get(name)  # noqa: E731
    interval = tuple(opts.cfg_interval) if opts.cfg_interval else (tuple(base["cfg_interval"]) if base.get("cfg_interval") else None)
    return Sampling(
        sampler=pick("sampler"), steps=pick("num_sampling_steps"), cfg_scale=pick("cfg_scale"),
        cfg_channels=opts.cfg_channels if opts.cfg_channels is not None else (3 if official else None),
        cfg_interval=interval, eta=opts.eta, time_shift=pick("time_shift"), precision=opts.precision, apg_eta=pick("apg_eta"),
    )  # fmt: skip


def load_pipeline(opts: SamplingOptions, device: torch.device | str | None = None) -> Pipeline:
    """Model, objective, sampling settings and VAE from the SamplingOptions fields. The cheap checks
    come first (files, arguments, the VAE's config.json), then the checkpoint; the VAE's weights last."""
    device = resolve_device(opts.device) if device is None else torch.device(device)
    adapter = read_adapter(opts.lora) if opts.lora else None
    # Without --ckpt, an adapter's own base; prompts: the text-to-image model.
    path = find_checkpoint(opts.ckpt or (adapter.base if adapter else None), BUNDLED_TEXT if opts.text else BUNDLED)
    recorded_config = peek_config(path)  # a model folder's: the flags are checked against it before the VAE is looked for
    if opts.model is None and recorded_config is not None and recorded_config.in_channels in (1, 3):
        check_pixel_size(recorded_config, opts.image_size)
    vae = find_vae(opts.vae) if opts.vae else None
    factor = vae_factor(vae.config) if vae is not None else 1
    if opts.image_size is not None and opts.image_size % factor:
        raise ValueError(f"image size {opts.image_size} is not divisible by the VAE's downsampling factor {factor}; use a multiple of {factor}.")

    ck = read_checkpoint(path)
    recorded = ck.meta.get("objective")
    if recorded is not None:
        objective_config = ObjectiveConfig(**recorded)
        if opts.objective is not None and opts.objective != objective_config.objective:
            raise ValueError(f"{path} records a {objective_config.objective} model; drop --objective {opts.objective} (or pass --objective {objective_config.objective}).")
        if opts.path is not None and opts.path != objective_config.path:
            raise ValueError(f"{path} records the {objective_config.path} path; drop --path {opts.path}.")
    else:  # official files and older ditkit models: the paper's diffusion unless told otherwise
        kind = opts.objective or "gaussian"
        if opts.path is not None and kind != "flow":
            raise ValueError("--path applies to flow models; add --objective flow.")
        objective_config = ObjectiveConfig(objective=kind, **({"path": opts.path} if opts.path else {}))
    requested = None
    if opts.model is not None:  # otherwise the checkpoint decides; --image-size etc. are checked below
        base = ck.config or infer_config(ck.state) or DiTConfig()
        input_size = opts.image_size // factor if opts.image_size is not None else base.input_size
        if len(base.sample_shape) == 4:
            raise ValueError(f"{path} holds a video model, which samples at the size it was trained at; drop --model.")
        asked = "MMDiT" if opts.model in MMDIT_PRESETS else "U-ViT" if opts.model in UVIT_PRESETS else "DiT"
        if family(base) != asked:
            raise ValueError(f"{path} holds {'an' if family(base) == 'MMDiT' else 'a'} {family(base)}, not {opts.model}; drop --model or pick a {family(base)} preset.")
        if isinstance(base, UViTConfig):
            requested = UViTConfig.from_preset(opts.model, img_size=input_size, in_chans=base.in_chans, conv=base.conv, num_classes=base.num_classes,
                                               class_dropout_prob=base.class_dropout_prob, mlp_time_embed=base.mlp_time_embed, qkv_bias=base.qkv_bias)  # fmt: skip
        elif isinstance(base, MMDiTConfig):
            requested = MMDiTConfig.from_preset(opts.model, input_size=input_size, in_channels=base.in_channels, learn_sigma=base.learn_sigma,
                                                context_dim=base.context_dim, pooled_dim=base.pooled_dim)  # fmt: skip
        else:
            overrides = dict(
                input_size=input_size, num_classes=opts.num_classes if opts.num_classes is not None else base.num_classes,
                in_channels=base.in_channels, learn_sigma=base.learn_sigma, block=base.block,
            )  # fmt: skip
            requested = DiTConfig.from_preset(opts.model, **overrides)
    model = load_model(ck, requested)
    if adapter is not None:
        model = apply_adapter(model, adapter)  # merged: sampling costs what the base costs
    model = model.to(device)
    c = model.config
    if c.in_channels not in (1, 3) and vae is None:
        sd = " (U-ViT's latent models decode with Stable Diffusion's kl-f8 VAE, stabilityai/sd-vae-ft-ema)" if isinstance(c, UViTConfig) else ""
        raise ValueError(f"this is a latent model ({c.in_channels} channels); pass --vae with an AutoencoderKL folder or hub id{sd}.")
    if vae is not None:
        if len(c.sample_shape) == 4:
            raise ValueError("this video model makes clips in pixel space; drop --vae.")
        if vae.config["latent_channels"] != c.in_channels:
            raise ValueError(f"the VAE makes {vae.config['latent_channels']}-channel latents but the model takes {c.in_channels}; pass the VAE the model was trained with.")
        if opts.image_size is not None and opts.image_size != c.input_size * factor:
            raise ValueError(f"image size {opts.image_size} needs a latent of {opts.image_size // factor} but the model takes {c.input_size}; use --image-size {c.input_size * factor}.")
    else:
        check_pixel_size(c, opts.image_size)
    text_encoder = load_text_encoder(opts, ck, c, device)
    if opts.num_classes is not None and text_encoder is None and opts.num_classes != c.num_real_classes:
        raise ValueError(f"the checkpoint has {c.num_real_classes} classes, not {opts.num_classes}; use --num-classes {c.num_real_classes}.")
    objective = build_objective(objective_config, learn_sigma=c.learn_sigma)
    sampling = resolve_sampling(opts, objective_config.objective, ck.meta.get("sampling", {}), ck.official)
    guide, guide_source = load_guide(opts, ck, objective_config, device)
    pipe = Pipeline(model=model, objective=objective, sampling=sampling, device=device, source=path, text_encoder=text_encoder,
                    lora=adapter.path if adapter else None, compile=opts.compile, guide=guide, guide_source=guide_source)  # checks the sampling settings, once
    if vae is not None:
        pipe.vae = load_vae(vae, device)
    return pipe


def check_pixel_size(c, image_size: int | None) -> None:
    if image_size is not None and image_size != c.input_size:
        raise ValueError(f"this pixel-space model makes {c.input_size}px images, not {image_size}px; use --image-size {c.input_size}.")


def load_guide(opts: SamplingOptions, ck, objective: ObjectiveConfig, device: torch.device) -> tuple[torch.nn.Module | None, Path | None]:
    """The autoguidance guide: --guide-ckpt, else the one the model records (a path relative to its
    folder), else none; 'none' turns a recorded guide off. It must predict what the model predicts:
    the same objective, path and time scale, and for prompts the same text encoder."""
    recorded = ck.meta.get("sampling", {}).get("guide")
    name = opts.guide_ckpt if opts.guide_ckpt is not None else recorded
    if name is None or name == "none":
        return None, None
    if opts.guide_ckpt is None:  # recorded beside the model: relative to its folder
        folder = ck.path if ck.path.is_dir() else ck.path.parent
        path = find_checkpoint(str(folder / name))
    else:
        path = find_checkpoint(name)
    gck = read_checkpoint(path)
    saved = gck.meta.get("objective")
    guide_objective = ObjectiveConfig(**saved) if saved is not None else ObjectiveConfig(objective=objective.objective, path=objective.path)
    differs = objective.prediction_differs(guide_objective)
    if differs:
        raise ValueError(f"the guide {path} predicts something else than the model ({', '.join(differs)}); "
                         "guide with a model trained with the same objective.")  # fmt: skip
    text = ck.meta.get("text_encoder", {}).get("name"), gck.meta.get("text_encoder", {}).get("name")
    if text[0] != text[1]:
        raise ValueError(f"the guide {path} reads prompts with {text[1]} but the model with {text[0]}; guide with a model of the same text encoder.")
    return load_model(gck).to(device), path


def load_text_encoder(opts: SamplingOptions, ck, config, device: torch.device):
    """The text encoder of a text-to-image model (the flag's, else the one it records); None for
    a class-conditional model, which takes no prompts."""
    if config.conditioning != "text":
        if opts.text:
            raise ValueError("this is a class-conditional model: it takes class ids (--classes), not prompts; drop --prompt/--prompts or pass --ckpt with a text-to-image model.")
        return None
    if opts.num_classes is not None:
        raise ValueError("this is a text-to-image model: it has no classes; drop --num-classes.")
    recorded = ck.meta.get("text_encoder", {})
    name = opts.text_encoder or recorded.get("name")
    if name is None:
        raise ValueError(f"{ck.path} does not record its text encoder; pass --text-encoder with the one it was trained with.")
    encoder = TextEncoder(name, device, recorded.get("max_length", TEXT_MAX_LENGTH))
    if encoder.width != config.context_dim:
        raise ValueError(f"the text encoder {name} gives {encoder.width}-wide embeddings but the model takes {config.context_dim}; "
                         f"pass --text-encoder with the one it was trained with ({recorded.get('name', 'see its config.json')}).")  # fmt: skip
    return encoder


def grid_pipeline(model: torch.nn.Module, objective, vae=None, precision: str = "fp32", device=None) -> Pipeline:
    """The pipeline of training sample grids: a fast deterministic sampler, light guidance."""
    kind = objective_name(objective)
    guided = max(getattr(model.config, "class_dropout_prob", 0), getattr(model.config, "prompt_dropout_prob", 0)) > 0
    sampler, steps = {"gaussian": ("ddim", 50), "flow": ("heun", 25), "vp": ("dpm-solver", 25), "meanflow": ("meanflow", 1)}[kind]
    sampling = Sampling(sampler=sampler, steps=steps, cfg_scale=1.5 if guided and kind != "meanflow" else 1.0, precision=precision)
    return Pipeline(model=model, objective=objective, sampling=sampling, vae=vae,
                    device=device if device is not None else next(model.parameters()).device)  # fmt: skip


def default_sampling(objective, sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                     cfg_interval: tuple[float, ...] = ()) -> Sampling:  # fmt: skip
    """What a model trained by ditkit records for `ditkit sample` to use with no flags: a fast
    sampler unless the run says otherwise (TrainConfig's default_* settings)."""
    kind = objective_name(objective)
    fast_sampler, fast_steps = FAST_SAMPLING[kind]
    unguided = 1.0 if kind == "meanflow" else 4.0  # MeanFlow's guidance is trained in
    return Sampling(sampler=sampler or fast_sampler, steps=steps or fast_steps,
                    cfg_scale=unguided if cfg_scale is None else cfg_scale, cfg_interval=tuple(cfg_interval) or None)  # fmt: skip
