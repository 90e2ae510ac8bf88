"""Sampling settings: the flags of `ditkit sample`, `sample-npz` and `serve`, a request to the server,
and `Sampling`, the settings a pipeline resolves from flags, checkpoint and defaults, checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .base import (
    CKPT_HELP,
    DEVICE_HELP,
    FLOW_PATHS,
    MAX_SAMPLING_STEPS,
    LORA_HELP,
    MMDIT_PRESETS,
    OBJECTIVES,
    PRECISIONS,
    PRESETS,
    UVIT_PRESETS,
    SAMPLER_OBJECTIVE,
    SAMPLERS,
    VAE_HELP,
    Config,
    option,
    positive,
    samplers_for,
)


APG_HELP = ("flow models: adaptive projected guidance (Sadat et al. 2024): of the guidance update, keep this fraction of the part parallel "
            "to the conditional prediction of the image (0: drop it, the paper's choice; it is what over-saturates) and all of the rest")


def check_sampler(sampler: str, objective: str) -> None:
    """One sentence when a sampler does not integrate the objective it is given."""
    if sampler not in samplers_for(objective):
        raise ValueError(f"sampler {sampler} is for {SAMPLER_OBJECTIVE[sampler]} models, but this is a {objective} model; use one of {', '.join(samplers_for(objective))}.")


@dataclass(frozen=True)
class Sampling(Config):
    """The sampling settings a pipeline runs with, resolved from the flags, what the checkpoint
    records and the official defaults, or given to `ditkit.sample`: checked here, once, in words
    that name the argument (a recorded or programmatic value has no flag)."""

    sampler: str = field(metadata=option("sampler"))
    steps: int = field(metadata=option("number of sampling steps"))
    cfg_scale: float = field(default=1.0, metadata=option("classifier-free guidance scale", finite=False))
    cfg_channels: int | None = field(default=None, metadata=option("guide only the first N output channels"))
    cfg_interval: tuple[float, ...] | None = field(default=None, metadata=option("guide only for t in [LO, HI]", ge=0, le=1, interval=True))
    eta: float = field(default=0.0, metadata=option("DDIM eta", finite=False))
    time_shift: float | None = field(default=None, metadata=positive("flow samplers: SD3 shift of the time grid"))
    precision: str = field(default="fp32", metadata=option("model precision", choices=PRECISIONS))
    apg_eta: float | None = field(default=None, metadata=option(APG_HELP, ge=0, le=1))

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if not 0 < self.steps <= MAX_SAMPLING_STEPS:
            raise ValueError(f"the number of sampling steps must be a positive whole number up to {MAX_SAMPLING_STEPS}, got {self.steps}.")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale}.")
        if self.cfg_channels is not None and self.cfg_channels <= 0:
            raise ValueError(f"cfg_channels must be positive (None guides all channels), got {self.cfg_channels}.")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}.")
        if self.cfg_interval == ():
            object.__setattr__(self, "cfg_interval", None)

    def to_dict(self) -> dict:
        """The "sampling" entry a model folder records (the keys of SamplingOptions)."""
        d = {"sampler": self.sampler, "num_sampling_steps": self.steps, "cfg_scale": self.cfg_scale}
        if self.cfg_interval is not None:
            d["cfg_interval"] = list(self.cfg_interval)
        if self.time_shift is not None:
            d["time_shift"] = self.time_shift
        if self.apg_eta is not None:
            d["apg_eta"] = self.apg_eta
        return d

    def describe(self) -> str:
        text = f"{self.sampler}, {self.steps} steps, cfg {self.cfg_scale:g}"
        if self.cfg_interval is not None and self.cfg_scale != 1:
            text += f" on t in [{self.cfg_interval[0]:g}, {self.cfg_interval[1]:g}]"
        if self.apg_eta is not None and self.cfg_scale != 1:
            text += f", APG eta {self.apg_eta:g}"
        if self.cfg_channels is not None:
            text += f" ({self.cfg_channels} channels)"
        if self.sampler == "ddim" and self.eta:
            text += f", eta {self.eta:g}"
        if self.time_shift not in (None, 1.0):
            text += f", time shift {self.time_shift:g}"
        if self.precision != "fp32":
            text += f", {self.precision}"
        return text


@dataclass(frozen=True)
class SamplingOptions(Config):
    """The sampling settings shared by `ditkit sample`, `ditkit sample-npz` and `ditkit serve`.
    None means: what the checkpoint records, else the official defaults."""

    ckpt: str | None = field(default=None, metadata=option(CKPT_HELP))
    model: str | None = field(default=None, metadata=option("preset such as DiT-XL/2 (default: read from the checkpoint)"))
    vae: str | None = field(default=None, metadata=option(VAE_HELP))
    objective: str | None = field(default=None, metadata=option("objective of an official .pt: gaussian (DiT) or flow (SiT); ditkit checkpoints record theirs", choices=OBJECTIVES))
    path: str | None = field(default=None, metadata=option("flow path of an official SiT .pt (default linear)", choices=FLOW_PATHS))
    image_size: int | None = field(default=None, metadata=positive("image size in pixels (default: from the checkpoint)"))
    num_classes: int | None = field(default=None, metadata=positive("number of classes (default: from the checkpoint)"))
    cfg_scale: float | None = field(default=None, metadata=option("classifier-free guidance scale; 1 = none (default: the model's, else 4.0)", ge=0))
    cfg_channels: int | None = field(default=None, metadata=positive("guide only the first N output channels (3 = official); default: 3 for official .pt files, else all"))
    cfg_interval: tuple[float, ...] = field(default=(), metadata=option("guide only for t in [LO, HI] (t = 0 noise, 1 data; e.g. 0.1 1.0)", ge=0, le=1, interval=True))
    num_sampling_steps: int | None = field(default=None, metadata=option("number of sampling steps (default: the model's, else 250)", gt=0, le=MAX_SAMPLING_STEPS))
    sampler: str | None = field(default=None, metadata=option("sampler (default: the model's, else ddpm / dopri5)", choices=SAMPLERS))
    time_shift: float | None = field(default=None, metadata=positive("flow samplers: SD3 shift of the time grid (default: the model's, else 1)"))
    eta: float = field(default=0.0, metadata=option("DDIM eta", ge=0))
    apg_eta: float | None = field(default=None, metadata=option(APG_HELP + " (default: the model's, else plain classifier-free guidance)", ge=0, le=1))
    device: str = field(default="auto", metadata=option(DEVICE_HELP))
    precision: str = field(default="fp32", metadata=option("model precision", choices=PRECISIONS))
    compile: bool = field(default=False, metadata=option("torch.compile the network: worth its start-up (tens of seconds) on long runs such as sample-npz and serve"))
    prompt: tuple[str, ...] = field(default=(), metadata=option("text-to-image models: a prompt; repeat the flag for more (default checkpoint: the bundled text model)", repeat=True))
    prompts: str | None = field(default=None, metadata=option("text-to-image models: a file of prompts, one per line, or a suite of fashion-mnist-captions (:seen, :unseen, :held-out, or all three)"))
    text_encoder: str | None = field(default=None, metadata=option("text-to-image models: Hugging Face text encoder folder or hub id (default: the one the model records)"))
    lora: str | None = field(default=None, metadata=option(LORA_HELP))
    guide_ckpt: str | None = field(default=None, metadata=option("autoguidance: guide with this weaker model of the same data and objective (smaller, or trained less; "
                                                                 "any --ckpt form) in place of the unconditional prediction, at --cfg-scale; "
                                                                 "'none' for classifier-free guidance (default: the guide the model records, else none)"))

    def check(self) -> None:
        if self.model is not None and self.model not in PRESETS + UVIT_PRESETS + MMDIT_PRESETS:
            raise ValueError(f"unknown preset {self.model!r}; choose one of {', '.join(PRESETS + UVIT_PRESETS + MMDIT_PRESETS)}.")
        for i, text in enumerate(self.prompt, 1):
            if not text.strip():
                raise ValueError(f"prompt {i} is empty; write what the image should show (the empty prompt is the null condition of guidance).")

    @property
    def text(self) -> bool:
        """Whether prompts were given (and so a text-to-image model is wanted)."""
        return bool(self.prompt or self.prompts)


@dataclass(frozen=True)
class SampleConfig(SamplingOptions):
    """Sample a checkpoint to a PNG grid (the bundled Fashion-MNIST model by default), or a trained
    video model (--ckpt results/NNN-VDiT-S-4x2/model) to an animated one."""

    classes: tuple[int, ...] = field(default=(), metadata=option("class ids to sample, cycled over the samples (default: every class, or 8 ImageNet demo classes)", ge=0))
    num_samples: int | None = field(default=None, metadata=option("number of samples (default: 4 per class for up to 16 classes, else one per class)", gt=0, le=100_000))
    seed: int = field(default=0, metadata=option("global seed for the initial and per-step noise"))
    batch_size: int = field(default=64, metadata=positive("samples per model batch"))
    out: str = field(default="samples", metadata=option("output folder (grid.png and one PNG per sample; for a video model grid.gif, grid.mp4 with PyAV, "
                                                        "grid-frames/ and one GIF per clip), or an image file such as grid.png (clips.gif, clips.mp4) for the grid alone"))
    save_images: bool | None = field(default=None, metadata=option("also write one PNG (GIF for a clip) per sample (default: yes into an --out folder; beside an --out file as NAME-000000.png only when asked)"))

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
class ServeConfig(SamplingOptions):
    """Serve a web page and a JSON API (POST /api/generate) over a checkpoint (the bundled model by
    default, offline). Requests that share sampler, steps and guidance scale are sampled as one model
    batch, and batches take turns step by step; the sampling flags set the defaults a request may
    override. A full queue and a missed deadline answer HTTP 503 with Retry-After. Requests from
    other sites' pages, for other host names, or with bodies that are not small JSON are refused."""

    host: str = field(default="127.0.0.1", metadata=option("address to listen on (0.0.0.0: every interface)"))
    port: int = field(default=7860, metadata=option("port to listen on", ge=1, le=65535))
    max_batch_size: int = field(default=64, metadata=positive("most images in one model batch"))
    batch_window: float = field(default=0.05, metadata=option("seconds the first request of a batch waits for others to join", ge=0, le=10))
    queue_size: int = field(default=256, metadata=positive("most requests waiting; beyond it the server answers 503 with Retry-After"))
    timeout: float = field(default=300.0, metadata=positive("deadline of a request in seconds; one not answered by then gets 503 with Retry-After"))
    max_samples: int = field(default=16, metadata=option("most images one request may ask for", gt=0, le=1024))
    max_steps: int = field(default=250, metadata=option("most sampling steps one request may ask for (dopri5: most steps it may try)", gt=0, le=1000))
    active_batches: int = field(default=4, metadata=option("batches sampled in turns, step by step, so that a small request need not wait for a large one to finish; each holds its memory meanwhile (1: one batch at a time)", gt=0, le=64))
    max_body: int = field(default=16384, metadata=option("largest request body in bytes; a larger one gets 413 (the default holds 16 prompts of 77 tokens)", ge=1024, le=2**24))
    allow_origin: tuple[str, ...] = field(default=(), metadata=option("origins (scheme://host[:port]) whose web pages may call the API besides the server's own page, or '*' for any (other sites' requests are refused)"))
    allow_host: tuple[str, ...] = field(default=(), metadata=option("host names the server answers to besides its address and this machine's names (a DNS name, a reverse proxy's), or '*' for any (requests for other names are refused: DNS rebinding)"))

    def check(self) -> None:
        super().check()
        for origin in self.allow_origin:
            scheme, _, where = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not where or "/" in where or not where.isprintable() or " " in where):
                raise ValueError(f"--allow-origin {origin[:60]!r} is not an origin; pass scheme://host[:port] as a browser sends it "
                                 "(http://localhost:3000, with no path or trailing slash), or '*'.")  # fmt: skip
        for host in self.allow_host:
            if host != "*" and not (host.isascii() and host.replace(".", "").replace("-", "").isalnum()):
                raise ValueError(f"--allow-host {host[:60]!r} is not a host name; pass the name alone (dit.example.org: no scheme, port or path), or '*'.")


@dataclass(frozen=True)
class GenerateRequest(Config):
    """The JSON body of `ditkit serve`'s POST /api/generate; unset fields take the server's defaults."""

    classes: tuple[int, ...] = field(default=(), metadata=option("class ids, cycled over the images (a class-conditional model)", ge=0))
    prompts: tuple[str, ...] = field(default=(), metadata=option("prompts, cycled over the images (a text-to-image model)"))
    num_samples: int | None = field(default=None, metadata=positive("number of images (default: one per class id or prompt)"))
    seed: int = field(default=0, metadata=option("seed of the request's noise: the same seed gives the same images", ge=0, lt=2**63))
    sampler: str | None = field(default=None, metadata=SamplingOptions.__dataclass_fields__["sampler"].metadata)
    num_sampling_steps: int | None = field(default=None, metadata=SamplingOptions.__dataclass_fields__["num_sampling_steps"].metadata)
    cfg_scale: float | None = field(default=None, metadata=SamplingOptions.__dataclass_fields__["cfg_scale"].metadata)


def _same_as_flag(name: str) -> dict:
    return SamplingOptions.__dataclass_fields__[name].metadata


@dataclass(frozen=True)
class RecordedSampling(Config):
    """The "sampling" entry of a model folder's config.json or a checkpoint (`Sampling.to_dict`):
    how `ditkit sample` samples the model when no flag says otherwise; checked as the flags are."""

    sampler: str | None = field(default=None, metadata=_same_as_flag("sampler"))
    num_sampling_steps: int | None = field(default=None, metadata=_same_as_flag("num_sampling_steps"))
    cfg_scale: float | None = field(default=None, metadata=_same_as_flag("cfg_scale"))
    cfg_interval: tuple[float, ...] = field(default=(), metadata=_same_as_flag("cfg_interval"))
    time_shift: float | None = field(default=None, metadata=_same_as_flag("time_shift"))
    apg_eta: float | None = field(default=None, metadata=_same_as_flag("apg_eta"))
    guide: str | None = field(default=None, metadata=option("autoguidance's guide, a folder relative to the model's ('none': classifier-free guidance)"))
