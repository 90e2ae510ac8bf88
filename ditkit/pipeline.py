"""A checkpoint -> model + objective + sampling settings + VAE: the one setup behind `ditkit sample`,
`ditkit sample-npz`, the training sample grids and `ditkit study`.

Sampling settings resolve in this order: what the caller gives, what the checkpoint records
(`config.json`'s "sampling", a training checkpoint's "sampling"), and the official defaults of the
objective (DiT's sample.py: DDPM 250 steps, CFG 4; SiT's: dopri5, CFG 4).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import MMDIT_PRESETS, TEXT_MAX_LENGTH, DiTConfig, MMDiTConfig, ObjectiveConfig, SamplingOptions, samplers_for
from .objectives import FlowMatching, GaussianDiffusion, build_objective, objective_name
from .samplers import DEFAULT_SAMPLER, check_embedded_guidance, check_guidance, check_sampler, sample

ASSETS = Path(__file__).parent / "assets"
BUNDLED = ASSETS / "fashion-mnist"
BUNDLED_NAME = "bundled"  # what --ckpt calls it; the other bundled models go by their folder names
BUNDLED_TEXT = ASSETS / "fashion-mnist-text"  # the default when prompts are given
VAE_SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
# The official sample.py's demo classes (ImageNet): used for 1000-class models when none are given.
IMAGENET_DEMO_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
# The official sample.py defaults of DiT and SiT (`sample.py ODE`), used when nothing else says.
OFFICIAL_SAMPLING = {
    "gaussian": {"sampler": "ddpm", "num_sampling_steps": 250, "cfg_scale": 4.0},
    "flow": {"sampler": "dopri5", "num_sampling_steps": 250, "cfg_scale": 4.0},
    "meanflow": {"sampler": "meanflow", "num_sampling_steps": 1, "cfg_scale": 1.0},  # the paper's: one step, guidance trained in
}


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings of a pipeline."""

    sampler: str
    steps: int
    cfg_scale: float = 1.0
    cfg_channels: int | None = None
    cfg_interval: tuple[float, float] | None = None
    eta: float = 0.0
    time_shift: float | None = None
    precision: str = "fp32"

    def to_dict(self) -> dict:
        """The "sampling" entry a model folder records (the keys of SamplingOptions)."""
        d = {"sampler": self.sampler, "num_sampling_steps": self.steps, "cfg_scale": self.cfg_scale}
        if self.cfg_interval is not None:
            d["cfg_interval"] = list(self.cfg_interval)
        if self.time_shift is not None:
            d["time_shift"] = self.time_shift
        return d

    def describe(self) -> str:
        text = f"{self.sampler}, {self.steps} steps, cfg {self.cfg_scale:g}"
        if self.cfg_interval is not None and self.cfg_scale != 1:
            text += f" on t in [{self.cfg_interval[0]:g}, {self.cfg_interval[1]:g}]"
        if self.cfg_channels is not None:
            text += f" ({self.cfg_channels} channels)"
        if self.sampler == "ddim" and self.eta:
            text += f", eta {self.eta:g}"
        if self.time_shift not in (None, 1.0):
            text += f", time shift {self.time_shift:g}"
        if self.precision != "fp32":
            text += f", {self.precision}"
        return text


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} was asked for but no CUDA GPU is available; use --device cpu.")
    return device


# A hub id is ORG/NAME; anything else (or an ORG/NAME folder that exists) is a local folder.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class VaeSource:
    """Where an AutoencoderKL comes from, found before any weights are read: a local folder, the
    hub's local cache, or the hub itself; `config` is its config.json."""

    name: str  # folder path or hub id
    config: dict
    local_only: bool  # a folder or the hub cache: load with no network access


def _quietly(fn, repo: str, **kwargs):
    """A diffusers loading call without huggingface_hub's deprecation warnings (it passes old arguments)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
        return fn(repo, **kwargs)


def find_vae(name: str) -> VaeSource:
    """The VAE `name` stands for ('ema'/'mse' shorthands, a folder, a hub id) with its config, in one
    sentence when it is not there: a missing folder is named as such, an unreachable hub is said
    once (no retries), so the image size and channels can be checked before any weights load."""
    from diffusers import AutoencoderKL

    repo = VAE_SHORTHANDS.get(name, name)
    folder = Path(repo).expanduser()
    if folder.is_file():
        raise ValueError(f"--vae {folder} is a file; pass the AutoencoderKL folder that holds config.json and the weights.")
    if folder.is_dir() or not HUB_ID.match(repo):
        if not folder.is_dir():
            raise ValueError(f"VAE folder {folder} does not exist; pass --vae with an AutoencoderKL folder (config.json + weights), a hub id (ORG/NAME) or ema / mse.")
        if not (folder / "config.json").is_file():
            raise ValueError(f"VAE folder {folder} has no config.json; pass a folder written by AutoencoderKL.save_pretrained.")
        return VaeSource(str(folder), AutoencoderKL.load_config(folder), local_only=True)
    try:  # downloaded before: the hub cache, with no network access
        return VaeSource(repo, _quietly(AutoencoderKL.load_config, repo, local_files_only=True), local_only=True)
    except OSError:
        pass
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError

    try:  # one request, no retries: an offline machine answers at once
        get_hf_file_metadata(hf_hub_url(repo, "config.json"))
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise ValueError(f"the Hugging Face hub has no AutoencoderKL {repo!r} (and there is no folder of that name); check the id or pass a local folder.") from None
    except Exception as e:
        raise ValueError(
            f"cannot reach the Hugging Face hub for VAE {repo!r} ({type(e).__name__}), and it is not in the local cache or a folder of "
            f"that name; download it where you are online (huggingface-cli download {repo} --local-dir DIR) and pass --vae DIR."
        ) from None
    return VaeSource(repo, _quietly(AutoencoderKL.load_config, repo), local_only=False)


def load_vae(vae: str | VaeSource, device: torch.device | str = "cpu"):
    """diffusers' AutoencoderKL from a local folder or a hub id (the local cache first), in eval mode."""
    from diffusers import AutoencoderKL
    from diffusers.utils import is_accelerate_available

    source = vae if isinstance(vae, VaeSource) else find_vae(vae)
    try:
        model = _quietly(AutoencoderKL.from_pretrained, source.name, local_files_only=source.local_only,
                          low_cpu_mem_usage=is_accelerate_available())  # fmt: skip
    except Exception as e:
        raise ValueError(f"cannot load the VAE weights from {source.name!r} ({type(e).__name__}); pass --vae with a complete AutoencoderKL folder (config.json + weights).") from None
    return model.to(device).eval()


def vae_factor(vae) -> int:
    """Pixels per latent cell of a VAE (or of its config): one halving per encoder block after the first."""
    config = getattr(vae, "config", vae)
    return 2 ** (len(config["block_out_channels"]) - 1)


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents (scaled as in training) -> images in [-1, 1]."""
    return vae.decode(z / vae.config.scaling_factor).sample


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounded as the official sample_ddp.py."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def save_grid(images: np.ndarray, path: str | Path, ncol: int, pad: int = 2) -> None:
    """(N, H, W, C) uint8 -> one PNG grid with `ncol` columns."""
    n, h, w, c = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


@dataclass
class Pipeline:
    """A network with its objective, sampling settings and (for latent models) its VAE."""

    model: torch.nn.Module
    objective: GaussianDiffusion | FlowMatching
    sampling: Sampling
    vae: object | None = None
    device: torch.device = torch.device("cpu")
    source: Path | None = None  # the checkpoint it was loaded from
    text_encoder: object | None = None  # a text.TextEncoder for text-to-image models
    lora: Path | None = None  # the LoRA adapter merged into the model's weights
    compile: bool = False  # sample through torch.compile(model), `network`

    def describe_source(self) -> str:
        return f"{self.source}" + (f" + LoRA {self.lora}" if self.lora else "")

    def __post_init__(self):
        self.network = torch.compile(self.model) if self.compile else self.model  # what the samplers call
        check_sampler(self.sampling.sampler, objective_name(self.objective))
        check_guidance(self.sampling.cfg_scale, self.sampling.cfg_channels, self.sampling.cfg_interval, self.config.in_channels)
        if getattr(self.config, "cfg_embed", False):
            check_embedded_guidance(self.config, self.sampling.cfg_scale, self.sampling.cfg_channels)

    @property
    def config(self) -> DiTConfig | MMDiTConfig:
        return self.model.config

    def condition(self, prompts: list[str]):
        """The TextCondition of `prompts` for a text-to-image pipeline."""
        if self.text_encoder is None:
            raise ValueError("this is a class-conditional model: it takes class ids (--classes), not prompts; pass --ckpt with a text-to-image model.")
        return self.text_encoder.encode(list(prompts))

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        return torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=generator, device=self.device)

    def latents(self, y: torch.Tensor, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                progress: bool = False, callback=None) -> torch.Tensor:  # fmt: skip
        """Samples in the model's input space for labels y; noise from `generator` (or the global RNG)
        unless given, and the per-step noise of stochastic samplers from the same source. `callback`
        gets the sampler's {"i": steps left, "x", ...} after every step."""
        s = self.sampling
        noise = self.noise(len(y), generator) if noise is None else noise
        options = {"time_shift": s.time_shift} if isinstance(self.objective, FlowMatching) and s.time_shift is not None else {}
        return sample(self.network, self.objective, noise, y.to(self.device), sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale,
                      cfg_channels=s.cfg_channels, cfg_interval=s.cfg_interval, eta=s.eta, generator=generator,
                      precision=s.precision, progress=progress, callback=callback, clip_denoised=self.vae is None, **options)  # fmt: skip

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
        cfg_interval=interval, eta=opts.eta, time_shift=pick("time_shift"), precision=opts.precision,
    )  # fmt: skip


def bundled_model(name: str) -> Path | None:
    """The bundled model a name means ("bundled", or an assets folder name such as
    fashion-mnist-turbo), or None; callers look for a path of that name first."""
    if name == BUNDLED_NAME:
        return BUNDLED
    return ASSETS / name if "/" not in name and (ASSETS / name / "model.safetensors").exists() else None


def find_checkpoint(ckpt: str | None, bundled: Path = BUNDLED) -> Path:
    """The checkpoint `--ckpt` names, as read_checkpoint takes it: a .pt or .safetensors file, a
    model folder, a run folder (RESULTS/NNN-MODEL: its model/, else its newest checkpoint) or its
    checkpoints/ folder; None (or "bundled") is the bundled model (`bundled`: the class-conditional
    one, or the text-to-image one), and a bundled model's folder name (fashion-mnist-turbo, ...)
    names it unless a path of that name exists. Only looks at the file system."""
    from .checkpoints import WEIGHTS_NAME
    from .train import checkpoint_steps

    if ckpt is None or (ckpt == BUNDLED_NAME and not Path(ckpt).exists()):
        if not (bundled / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"this install has no bundled model at {bundled}; pass --ckpt with a checkpoint.")
        return bundled
    path = Path(ckpt).expanduser()
    if not path.exists() and bundled_model(ckpt) is not None:
        return bundled_model(ckpt)
    if not path.exists():
        names = ", ".join(sorted(d.name for d in ASSETS.iterdir() if (d / WEIGHTS_NAME).exists()))
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .pt file, a ditkit model folder, a run folder (RESULTS/NNN-MODEL) or a bundled model ({names}).")
    if not path.is_dir() or (path / WEIGHTS_NAME).exists():
        return path
    if (path / "model" / WEIGHTS_NAME).exists():
        return path / "model"
    for folder in (path / "checkpoints", path):
        steps = checkpoint_steps(folder)
        if steps:
            return folder / f"{steps[-1]:07d}.pt"
    raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME}, model/ or checkpoints/*.pt; point --ckpt at a .pt file, a ditkit model folder or a run folder (RESULTS/NNN-MODEL).")


def load_pipeline(opts: SamplingOptions, device: torch.device | str | None = None) -> Pipeline:
    """Model, objective, sampling settings and VAE from the SamplingOptions fields. The cheap checks
    come first (files, arguments, the VAE's config.json), then the checkpoint; the VAE's weights last."""
    from .checkpoints import infer_config, load_model, read_checkpoint

    device = resolve_device(opts.device) if device is None else torch.device(device)
    adapter = None
    if opts.lora:
        from .lora import read_adapter

        adapter = read_adapter(opts.lora)
    # Without --ckpt, an adapter's own base; prompts: the text-to-image model.
    path = find_checkpoint(opts.ckpt or (adapter.base if adapter else None), BUNDLED_TEXT if opts.text else BUNDLED)
    if opts.sampler is not None and opts.objective is not None:
        check_sampler(opts.sampler, opts.objective)
    check_guidance(opts.cfg_scale if opts.cfg_scale is not None else 1.0, None, opts.cfg_interval or None, 1)
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
    if opts.sampler is not None:
        check_sampler(opts.sampler, objective_config.objective)
    requested = None
    if opts.model is not None:  # otherwise the checkpoint decides; --image-size etc. are checked below
        base = ck.config or infer_config(ck.state) or DiTConfig()
        input_size = opts.image_size // factor if opts.image_size is not None else base.input_size
        if isinstance(base, MMDiTConfig) != (opts.model in MMDIT_PRESETS):
            raise ValueError(f"{path} holds {'an MMDiT' if isinstance(base, MMDiTConfig) else 'a DiT'}, not {opts.model}; drop --model or pick a preset of that kind.")
        if isinstance(base, MMDiTConfig):
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
        from .lora import apply_adapter

        model = apply_adapter(model, adapter)  # merged: sampling costs what the base costs
    model = model.to(device)
    c = model.config
    if c.in_channels not in (1, 3) and vae is None:
        raise ValueError(f"this is a latent model ({c.in_channels} channels); pass --vae with an AutoencoderKL folder or hub id.")
    if vae is not None:
        if vae.config["latent_channels"] != c.in_channels:
            raise ValueError(f"the VAE makes {vae.config['latent_channels']}-channel latents but the model takes {c.in_channels}; pass the VAE the model was trained with.")
        if opts.image_size is not None and opts.image_size != c.input_size * factor:
            raise ValueError(f"image size {opts.image_size} needs a latent of {opts.image_size // factor} but the model takes {c.input_size}; use --image-size {c.input_size * factor}.")
    elif opts.image_size is not None and opts.image_size != c.input_size:
        raise ValueError(f"this pixel-space model makes {c.input_size}px images, not {opts.image_size}px; use --image-size {c.input_size}.")
    text_encoder = load_text_encoder(opts, ck, c, device)
    if opts.num_classes is not None and text_encoder is None and opts.num_classes != c.num_classes:
        raise ValueError(f"the checkpoint has {c.num_classes} classes, not {opts.num_classes}; use --num-classes {c.num_classes}.")
    objective = build_objective(objective_config, learn_sigma=c.learn_sigma)
    sampling = resolve_sampling(opts, objective_config.objective, ck.meta.get("sampling", {}), ck.official)
    pipe = Pipeline(model=model, objective=objective, sampling=sampling, device=device, source=path, text_encoder=text_encoder,
                    lora=adapter.path if adapter else None, compile=opts.compile)  # checks the guidance settings
    if vae is not None:
        pipe.vae = load_vae(vae, device)
    return pipe


def load_text_encoder(opts: SamplingOptions, ck, config, device: torch.device):
    """The text encoder of a text-to-image model (the flag's, else the one it records); None for
    a class-conditional model, which takes no prompts."""
    if not isinstance(config, MMDiTConfig):
        if opts.text:
            raise ValueError("this is a class-conditional model: it takes class ids (--classes), not prompts; drop --prompt/--prompts or pass --ckpt with a text-to-image model.")
        return None
    from .text import TextEncoder

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
    sampler, steps = {"gaussian": ("ddim", 50), "flow": ("heun", 25), "meanflow": ("meanflow", 1)}[kind]
    sampling = Sampling(sampler=sampler, steps=steps, cfg_scale=1.5 if guided and kind != "meanflow" else 1.0, precision=precision)
    return Pipeline(model=model, objective=objective, sampling=sampling, vae=vae,
                    device=device if device is not None else next(model.parameters()).device)  # fmt: skip


def default_sampling(objective, sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                     cfg_interval: tuple[float, ...] = ()) -> Sampling:  # fmt: skip
    """What a model trained by ditkit records for `ditkit sample` to use with no flags: a fast
    sampler unless the run says otherwise (TrainConfig's default_* settings)."""
    kind = objective_name(objective)
    if kind == "meanflow":  # one step, guidance trained in
        return Sampling(sampler=sampler or "meanflow", steps=steps or 1, cfg_scale=1.0 if cfg_scale is None else cfg_scale,
                        cfg_interval=tuple(cfg_interval) or None)  # fmt: skip
    flow = kind == "flow"
    return Sampling(sampler=sampler or ("heun" if flow else "dpm++2m"), steps=steps or (5 if flow else 10),
                    cfg_scale=4.0 if cfg_scale is None else cfg_scale, cfg_interval=tuple(cfg_interval) or None)  # fmt: skip
