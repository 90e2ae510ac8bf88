"""Configs of the commands that train: `ditkit train` (nested by concern, flags flat), `ditkit
distill` and `ditkit dpo`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import (
    BAD_IMAGE_ACTIONS,
    DEFAULT_TEXT_ENCODER,
    DEVICE_HELP,
    DISTILL_METHODS,
    EMA_SCHEDULES,
    LORA_TARGETS_HELP,
    LR_SCHEDULES,
    MAX_SAMPLING_STEPS,
    MIN_FRAMES,
    MMDIT_PRESETS,
    PRESETS,
    SAMPLERS,
    TEXT_MAX_LENGTH,
    TRAIN_PRECISIONS,
    UVIT_PRESETS,
    VAE_HELP,
    VIDEO_MMDIT_PRESETS,
    VIDEO_PRESETS,
    Config,
    Grouped,
    field_default,
    flag,
    nonnegative,
    option,
    positive,
    samplers_for,
)
from .models import DiTConfig, DiTDesign, UViTConfig, VideoDesign, VideoDiTConfig
from .objectives import ObjectiveConfig, ObjectiveFlags

# -- the groups of ditkit train's settings -----------------------------------------------------


@dataclass(frozen=True)
class NetOptions(Config):
    """Which network: a preset, resized if you like (its design is DiTDesign's)."""

    model: str = field(default="DiT-XL/2", metadata=option("preset: DiT-* (class-conditional), U-ViT-* (class-conditional, the official U-ViT), MMDiT-* "
                                                           "(text-to-image, flow objective), VDiT-*/PxT (video, P x P patches over T-frame tubelets) "
                                                           "or MMDiT-*/PxT (text-to-video, flow objective)",
                                                           choices=PRESETS + UVIT_PRESETS + MMDIT_PRESETS + VIDEO_PRESETS + VIDEO_MMDIT_PRESETS))
    depth: int | None = field(default=None, metadata=positive("override the preset's depth"))
    hidden_size: int | None = field(default=None, metadata=positive("override the preset's hidden size"))
    num_heads: int | None = field(default=None, metadata=positive("override the preset's head count"))
    patch_size: int | None = field(default=None, metadata=positive("override the preset's patch size"))
    learn_sigma: bool = field(default=True, metadata=option("learn the variance (hybrid MSE + VB loss; flow models ignore the extra channels; U-ViTs never learn it)"))
    class_dropout_prob: float = field(default=0.1, metadata=option("label dropout for classifier-free guidance", ge=0, lt=1))
    text_encoder: str = field(default=DEFAULT_TEXT_ENCODER, metadata=option("MMDiT models: Hugging Face text encoder folder or hub id (CLIP, T5, sentence-transformers, BERT)"))
    text_max_length: int = field(default=TEXT_MAX_LENGTH, metadata=positive("MMDiT models: tokens per caption; longer ones are cut"))

    def sizes(self) -> dict:
        """The preset overrides that were given (None: the preset's)."""
        return {"depth": self.depth, "hidden_size": self.hidden_size, "num_heads": self.num_heads, "patch_size": self.patch_size}


@dataclass(frozen=True)
class DataOptions(Config):
    """What the model learns from."""

    data_path: str = field(default="fashion-mnist", metadata=option("image folder, latent store (ditkit extract), or fashion-mnist / mnist / digits; for MMDiT models a folder of captioned images or fashion-mnist-captions; "
                                                                    "for video models a folder of clips (GIF, MP4, folders of frames) or moving-fashion-mnist"))
    frames: int | None = field(default=None, metadata=option(f"video models: frames per clip (default: the data's; moving-fashion-mnist: 16, at least {MIN_FRAMES})", gt=0))
    image_size: int | None = field(default=None, metadata=positive("image size in pixels (default: the dataset's own)"))
    channels: int | None = field(default=None, metadata=option("1 or 3 image channels (default: the dataset's own)", choices=(1, 3)))
    num_classes: int | None = field(default=None, metadata=positive("number of classes (default: the dataset's)"))
    vae: str | None = field(default=None, metadata=option("encode images with this AutoencoderKL each step (default: none = pixel space, or the latent store's)"))
    flip: bool = field(default=True, metadata=option("random horizontal flips"))
    num_workers: int | None = field(default=None, metadata=nonnegative("data loader processes per rank (default: 4, or the cores there are where fewer)"))
    on_bad_image: str = field(default="skip", metadata=option("on an unreadable image: skip it (with a warning) or stop", choices=BAD_IMAGE_ACTIONS))


@dataclass(frozen=True)
class OptimOptions(Config):
    """AdamW and its learning-rate schedule, over a global batch."""

    global_batch_size: int = field(default=256, metadata=positive("batch size summed over all processes"))
    lr: float = field(default=1e-4, metadata=positive("AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=nonnegative("AdamW weight decay"))
    warmup_steps: int = field(default=0, metadata=nonnegative("linear learning-rate warm-up steps (the paper: none)"))
    lr_schedule: str = field(default="constant", metadata=option("after warm-up: constant (the paper), or cosine / linear decay to --min-lr at the last step", choices=LR_SCHEDULES))
    min_lr: float = field(default=0.0, metadata=nonnegative("learning rate at the last step of a cosine or linear schedule"))
    adam_beta2: float = field(default=0.999, metadata=option("AdamW beta2 (0.95 steadies high learning rates)", gt=0, lt=1))
    grad_clip: float | None = field(default=None, metadata=positive("clip the gradient norm to this (default: no clipping)"))


@dataclass(frozen=True)
class EMAOptions(Config):
    """The exponential moving average of the weights, which is what a run's model folder holds."""

    ema_decay: float = field(default=0.9999, metadata=option("EMA decay, applied every step", ge=0, lt=1))
    ema_schedule: str = field(default="constant", metadata=option("constant decay (the paper); warmup: min(decay, (1 + step) / (10 + step)); power: EDM2's (1 - 1/step)^(gamma + 1), an average over a fixed fraction of the run", choices=EMA_SCHEDULES))
    ema_gamma: float = field(default=6.94, metadata=positive("exponent of the power EMA (6.94: a relative width of 0.10; 16.97: 0.05)"))
    ema_profiles: tuple[float, ...] = field(default=(), metadata=option("post-hoc EMA (EDM2): also keep power EMAs of these relative widths (sigma_rel, e.g. 0.05 0.10) and save "
                                                                        "snapshots of them in RUN/ema/ every --ema-snapshot-every steps, from which `ditkit ema` makes the EMA of any width afterwards", gt=0, lt=0.28))
    ema_snapshot_every: int = field(default=500, metadata=positive("steps between the snapshots of --ema-profiles (and one at the last step)"))


@dataclass(frozen=True)
class RunOptions(Config):
    """Where the run lives, how long it runs, how often it logs and saves, and where it starts."""

    results_dir: str = field(default="results", metadata=option("experiments are written to RESULTS_DIR/NNN-MODEL/"))
    epochs: int = field(default=1400, metadata=positive("number of epochs"))
    max_steps: int | None = field(default=None, metadata=positive("stop after this many steps"))
    max_minutes: float | None = field(default=None, metadata=positive("also stop (with a checkpoint) after this many minutes of training"))
    fit_to_minutes: bool = field(default=False, metadata=option("with --max-minutes and a cosine or linear --lr-schedule: end the decay where the clock will stop the run, not at --max-steps "
                                                                "(re-estimated at each log step from the speed so far), so that a slower machine still anneals to --min-lr; "
                                                                "the schedule then depends on the machine's speed"))
    global_seed: int = field(default=0, metadata=option("seed of the whole run", ge=0))
    log_every: int = field(default=100, metadata=positive("log the all-reduced loss every N steps"))
    ckpt_every: int = field(default=50_000, metadata=positive("checkpoint every N steps (and always at the last step)"))
    keep_last: int = field(default=3, metadata=positive("keep the newest K checkpoints"))
    keep_every: int | None = field(default=None, metadata=positive("also keep every checkpoint whose step is a multiple of M"))
    sample_every: int | None = field(default=None, metadata=positive("write an EMA sample grid every N steps"))
    resume: str | None = field(default=None, metadata=option("continue a run: 'latest' in RESULTS_DIR, a run folder, or a checkpoint; with the run's own settings, of which only "
                                                             "--max-steps, --max-minutes, --fit-to-minutes, --epochs, the log/checkpoint/sample cadence, the recorded sampling defaults, --num-workers, --precision, --compile may change (a flag at its default counts as not given)"))
    init_from: str | None = field(default=None, metadata=option("start from this model's weights, its architecture and objective (a model folder, run folder, checkpoint or 'bundled'): fine-tuning; the frozen base of --lora-rank"))


@dataclass(frozen=True)
class SamplingDefaults(Config):
    """How `ditkit sample` samples the trained model when given no flags (recorded with it)."""

    default_sampler: str | None = field(default=None, metadata=option("the sampler the trained model records for `ditkit sample` (default: dpm++2m or heun)", choices=SAMPLERS))
    default_steps: int | None = field(default=None, metadata=option("the sampling steps it records", gt=0, le=MAX_SAMPLING_STEPS))
    default_cfg_scale: float | None = field(default=None, metadata=option("the guidance scale it records", ge=0))
    default_cfg_interval: tuple[float, ...] = field(default=(), metadata=option("the guidance interval it records (t = 0 noise, 1 data)", ge=0, le=1, interval=True))


@dataclass(frozen=True)
class SystemOptions(Config):
    """How the run uses this machine: precision, compilation, memory, processes."""

    precision: str = field(default="fp32", metadata=option("fp32 (TF32 matmuls on GPU, as official), bf16 autocast, or auto: bf16 where its matmuls are fast "
                                                           "(a GPU that has them, a CPU with AMX or AVX512-BF16), else fp32", choices=TRAIN_PRECISIONS))
    compile: bool = field(default=False, metadata=option("torch.compile the model"))
    grad_checkpointing: bool = field(default=False, metadata=option("recompute block activations in backward"))
    parallel: str = field(default="ddp", metadata=option("ddp, or fsdp (FSDP2) for models that do not fit one GPU", choices=("ddp", "fsdp")))
    device: str = field(default="auto", metadata=option("cpu, cuda, or auto"))


@dataclass(frozen=True)
class LoraOptions(Config):
    """A LoRA adapter trained on a frozen --init-from model instead of every weight."""

    lora_rank: int = field(default=0, metadata=nonnegative("train only a LoRA adapter of this rank on the --init-from model and save only it (RUN/adapter); 0 = train every weight"))
    lora_alpha: float | None = field(default=None, metadata=positive("LoRA scale numerator: the update is (alpha / rank) B A (default: the rank)"))
    lora_targets: tuple[str, ...] = field(default=(), metadata=option(LORA_TARGETS_HELP))


@dataclass(frozen=True)
class AdapterRecord(Config):
    """The settings ditkit writes into an adapter's adapter_config.json (peft's names), checked as
    flags are when an adapter is read; every other peft setting keeps peft's default."""

    r: int = field(metadata=positive("rank of the LoRA matrices"))
    lora_alpha: float = field(metadata=positive("scale numerator: the update is (alpha / r) B A"))
    target_modules: tuple[str, ...] = field(metadata=option("module-name suffixes that carry LoRA"))
    base_model_name_or_path: str | None = field(default=None, metadata=option("the base checkpoint it was trained on"))

    def check(self) -> None:
        if not self.target_modules or not all(self.target_modules):
            raise ValueError(f"{flag('target_modules')} must name the layers that carry LoRA, got {list(self.target_modules)}.")


@dataclass(frozen=True, init=False)
class TrainConfig(Grouped):
    """Train a DiT (the paper's recipe by default). Run under torchrun for many processes."""

    net: NetOptions = field(default_factory=NetOptions)
    design: DiTDesign = field(default_factory=DiTDesign)
    spacetime: VideoDesign = field(default_factory=VideoDesign)
    loss: ObjectiveFlags = field(default_factory=ObjectiveFlags)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    ema: EMAOptions = field(default_factory=EMAOptions)
    run: RunOptions = field(default_factory=RunOptions)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    system: SystemOptions = field(default_factory=SystemOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)

    def check(self) -> None:
        if self.lora_rank and not self.init_from:
            raise ValueError("--lora-rank trains an adapter on an existing model; pass --init-from with it (a model folder, a run folder or bundled).")
        if (self.lora_alpha is not None or self.lora_targets) and not self.lora_rank:
            raise ValueError("--lora-alpha and --lora-targets shape a LoRA adapter; add --lora-rank R (or drop them).")
        if self.fit_to_minutes and (self.max_minutes is None or self.lr_schedule == "constant"):
            raise ValueError("--fit-to-minutes fits a decaying learning rate to a time budget; give it --max-minutes and --lr-schedule cosine or linear (or drop it).")
        if self.ema_profiles and (self.lora_rank or self.parallel == "fsdp"):
            raise ValueError("--ema-profiles keeps whole copies of the weights: it runs with full training under --parallel ddp; drop it for LoRA or FSDP runs.")
        if self.lora_rank and self.parallel == "fsdp":
            raise ValueError("a LoRA adapter is small enough to train with --parallel ddp; drop --parallel fsdp.")
        if self.init_from and self.text and self.lora_rank:
            raise ValueError("--lora-rank adapts class-conditional DiTs; a text-to-image model continues with every weight, so drop --lora-rank.")
        # With --init-from and no --objective the objective is the base's, not known yet: the trainer
        # merges it in (train.resume.base_objective) and these checks run again on the merged config.
        if not (self.init_from is not None and self.objective == field_default(ObjectiveConfig, "objective")):
            objective = self.objective_config().objective  # flow-only settings on a gaussian run fail here
            if self.default_sampler is not None and self.default_sampler not in samplers_for(objective):
                raise ValueError(f"--default-sampler {self.default_sampler} does not sample {objective} models; pick one of {', '.join(samplers_for(objective))}.")
        if self.uvit and self.objective == "meanflow":
            raise ValueError(f"--objective meanflow needs a network that takes a second time (a DiT); {self.model} takes one, so use a DiT-* preset.")
        if self.text and self.objective != "flow":
            raise ValueError(f"{self.model} is a text-to-image model trained by flow matching, as SD3; add --objective flow.")
        if self.video:
            self._check_video()
        elif self.data_path == "moving-fashion-mnist" or self.frames is not None or self.spacetime != VideoDesign():
            raise ValueError(f"moving-fashion-mnist, --frames, --attention and --window are for video models; pick a VDiT-* --model (e.g. {VIDEO_PRESETS[4]}).")
        if not self.text and (self.data_path in ("fashion-mnist-captions", "moving-fashion-mnist-captions") or self.text_encoder != DEFAULT_TEXT_ENCODER):
            text_model, plain = (self.model.replace("VDiT", "MMDiT"), "moving-fashion-mnist") if self.video else (self.model.replace("DiT", "MMDiT"), "fashion-mnist")
            raise ValueError(f"captions and --text-encoder are for text-conditioned models; use --model {text_model} (or --data-path {plain} for {self.model}).")
        if self.text and self.design.mlp_conv:
            raise ValueError(f"--mlp-conv is a DiT's block option; {self.model} (an MMDiT) has no such block, so drop it.")
        if self.uvit and self.design != DiTDesign():
            changed = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.design.__dict__.items() if v != field_default(DiTDesign, k))
            raise ValueError(f"{changed} shape a DiT's blocks; {self.model} is the official U-ViT (LayerNorm, GELU MLPs, learned positions), "
                             "so drop them (a recipe's: pass --block adaln_zero --mlp gelu --norm layernorm --no-qk-norm --pos-embed sincos).")  # fmt: skip

    def _check_video(self) -> None:
        if self.vae is not None or self.init_from is not None:
            raise ValueError(f"{self.model} is a video model, trained from scratch in pixel space; drop --vae and --init-from.")
        if self.data_path in ("fashion-mnist", "mnist", "digits", "fashion-mnist-captions"):
            raise ValueError(f"{self.model} is a video model and {self.data_path} holds images; pass --data-path moving-fashion-mnist or a folder of clips.")
        if self.objective == "meanflow":  # its second time input (r) is a DiT's, not yet the video DiT's
            raise ValueError(f"{self.model} is a video model, which trains with --objective flow or gaussian, not meanflow; pick one of those.")
        if self.text and self.spacetime != VideoDesign():
            raise ValueError(f"{self.model} attends over the prompt and all spacetime tokens together (joint attention); drop --attention and --window.")
        if self.text and self.data_path == "moving-fashion-mnist":
            raise ValueError(f"{self.model} is a text-to-video model and moving-fashion-mnist has no captions; pass --data-path moving-fashion-mnist-captions.")

    @property
    def text(self) -> bool:
        """Whether this run trains a text-conditioned model (MMDiT; a text-to-video one is also `video`)."""
        return self.model in MMDIT_PRESETS + VIDEO_MMDIT_PRESETS

    @property
    def uvit(self) -> bool:
        """Whether this run trains a U-ViT."""
        return self.model in UVIT_PRESETS

    @property
    def video(self) -> bool:
        """Whether this run trains a video model (VDiT, or a text-to-video MMDiT)."""
        return self.model in VIDEO_PRESETS + VIDEO_MMDIT_PRESETS

    def objective_config(self) -> ObjectiveConfig:
        return self.loss.settled()

    def model_config(self, num_classes: int, input_size: int, in_channels: int) -> DiTConfig | UViTConfig:
        """The DiT (or U-ViT) these settings make for data of `num_classes` classes and `in_channels` x input_size^2 items.
        A U-ViT's label table holds a null row when labels are dropped, and its output convolution is
        on for pixels and off for latents, as the official configs have it."""
        n = self.net
        if self.uvit:
            sizes = {"embed_dim" if k == "hidden_size" else k: v for k, v in n.sizes().items() if v is not None}
            return UViTConfig.from_preset(self.model, **sizes, img_size=input_size, in_chans=in_channels, conv=in_channels in (1, 3),
                                          num_classes=num_classes + (n.class_dropout_prob > 0), class_dropout_prob=n.class_dropout_prob)  # fmt: skip
        return DiTConfig.from_preset(self.model, **n.sizes(), input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                     learn_sigma=n.learn_sigma, class_dropout_prob=n.class_dropout_prob, time_inputs=2 if self.objective == "meanflow" else 1,
                                     **{f: getattr(self.design, f) for f in DiTDesign.__dataclass_fields__})  # fmt: skip

    def video_model_config(self, num_classes: int, input_size: int, in_channels: int, frames: int) -> VideoDiTConfig:
        """The video DiT these settings make for clips of `frames` frames of `in_channels` x input_size^2."""
        n = self.net
        design = {f: getattr(self.design, f) for f in DiTDesign.__dataclass_fields__} | {f: getattr(self.spacetime, f) for f in VideoDesign.__dataclass_fields__}
        return VideoDiTConfig.from_preset(self.model, **n.sizes(), input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                                          learn_sigma=n.learn_sigma, class_dropout_prob=n.class_dropout_prob, frames=frames, **design)  # fmt: skip


@dataclass(frozen=True)
class DistillConfig(Config):
    """Distil a flow-matching teacher into a student that needs fewer network evaluations, starting
    from the teacher's weights and data. guidance: the student takes the guidance scale as an input
    and samples guided in one pass instead of two. progressive: a student of N Euler steps learns to
    do in one step what its teacher does in two, N halving per phase from --start-steps down to
    --student-steps (the first teacher is the guided one, so the students need no guidance). reflow:
    (noise, sample) pairs from the guided teacher's sampler, cached in the run folder, and the
    straight line between them. add (Sauer et al. 2023): a student of --student-steps Euler steps learns
    from the guided teacher's denoised estimate of its re-noised sample and from a discriminator on a
    frozen network's features of the clean sample (--disc-net); ladd (Sauer et al. 2024): the same with
    the discriminator on the teacher's own features of re-noised samples. The run folder, checkpoints,
    EMA and --resume are ditkit train's (the discriminator and its optimizer included)."""

    teacher: str | None = field(default=None, metadata=option("the flow-matching teacher: a ditkit model folder, run folder or training checkpoint"))
    method: str = field(default="guidance", metadata=option("guidance, progressive, reflow, add or ladd", choices=DISTILL_METHODS))
    data_path: str | None = field(default=None, metadata=option("training data (default: the teacher's, as its checkpoint records)"))
    student_init: str | None = field(default=None, metadata=option("start the student from this model of the teacher's architecture (a student of it, such as fashion-mnist-turbo) instead of the teacher's weights"))
    results_dir: str = field(default="results", metadata=option("runs are written to RESULTS_DIR/NNN-distill-METHOD/"))
    max_steps: int = field(default=1000, metadata=positive("student optimizer steps in all (progressive: split evenly over its phases)"))
    max_minutes: float | None = field(default=None, metadata=positive("also stop (with a checkpoint) after this many minutes; --resume continues"))
    global_batch_size: int = field(default=32, metadata=positive("batch size summed over all processes"))
    lr: float = field(default=1e-4, metadata=positive("AdamW learning rate"))
    ema_decay: float = field(default=0.999, metadata=option("EMA decay", ge=0, lt=1))
    ema_schedule: str = field(default="warmup", metadata=option("EMA schedule, as ditkit train's (warmup suits short runs)", choices=EMA_SCHEDULES))
    cfg_scale: float | None = field(default=None, metadata=option("the guidance scale progressive and reflow students bake in, and the guidance student records (default: the teacher's)", ge=0))
    cfg_interval: tuple[float, ...] = field(default=(), metadata=option("the guidance interval LO HI that goes with it (default: the teacher's)", ge=0, le=1, interval=True))
    cfg_range: tuple[float, ...] = field(default=(1.0, 4.0), metadata=option("guidance: the scales LO HI the student learns (must hold 1, the scale outside the guidance interval)", ge=0))
    student_steps: int = field(default=1, metadata=positive("progressive, reflow, add, ladd: the Euler steps the student records as its default (progressive: its last phase's; add, ladd: the grid it trains on)"))
    start_steps: int = field(default=8, metadata=positive("progressive: Euler steps of the first phase's student, --student-steps times a power of 2"))
    reflow_pairs: int = field(default=2048, metadata=positive("reflow: (noise, teacher sample) pairs to generate and train on"))
    one_step_share: float = field(default=0.3, metadata=option("reflow: the last share of the steps that put half of each batch at t = 0 (the 1-step map)", ge=0, le=1))
    adv_weight: float = field(default=1.0, metadata=nonnegative("add, ladd: the adversarial gradient on the student's sample, as a multiple of the distillation gradient's norm"))
    disc_lr: float | None = field(default=None, metadata=positive("add, ladd: the discriminator's AdamW learning rate (default: --lr)"))
    r1_weight: float = field(default=1.0, metadata=nonnegative("add, ladd: weight of the approximated R1 penalty, |D(x) - D(x + small noise)|^2 on real samples"))
    disc_warmup: int = field(default=0, metadata=nonnegative("add, ladd: steps at the start in which only the discriminator learns (the student waits for a judge that is not random)"))
    adv_t_mean: float = field(default=0.0, metadata=option("ladd: location of the logit-normal noise levels the discriminator reads the samples at, as --t-mean (0: around the middle; negative: less noise, finer detail)"))
    disc_net: str = field(default="teacher", metadata=option("add: the frozen network whose features of clean samples the discriminator reads: 'teacher', or a DiT "
                                                             "model folder, run folder or checkpoint whose input fits (never a network that judges the results)"))
    global_seed: int = field(default=0, metadata=option("seed of the whole run", ge=0))
    num_workers: int = field(default=2, metadata=nonnegative("data loader processes per rank"))
    log_every: int = field(default=50, metadata=positive("log the loss every N steps"))
    ckpt_every: int = field(default=250, metadata=positive("checkpoint every N steps (and always at the last step)"))
    keep_last: int = field(default=2, metadata=positive("keep the newest K checkpoints"))
    precision: str = field(default="fp32", metadata=option("fp32, bf16 autocast, or auto (bf16 where its matmuls are fast)", choices=TRAIN_PRECISIONS))
    device: str = field(default="auto", metadata=option(DEVICE_HELP))
    resume: str | None = field(default=None, metadata=option("continue a distillation: 'latest' in RESULTS_DIR, a run folder, or a checkpoint, with its own settings "
                                                             "(only --max-steps, except for progressive runs, --max-minutes, the log/checkpoint cadence, --num-workers and --precision may change)"))

    def check(self) -> None:
        if not self.teacher and not self.resume:
            raise ValueError("--teacher is required; pass the flow-matching model to distil (a model folder, run folder or checkpoint).")
        if len(self.cfg_range) != 2 or not self.cfg_range[0] <= 1 <= self.cfg_range[1]:
            raise ValueError(f"--cfg-range takes two numbers LO <= 1 <= HI (1, no guidance, is the scale outside the guidance interval), got {' '.join(map(str, self.cfg_range))}.")
        if self.method == "progressive":
            ratio = self.start_steps // self.student_steps
            if self.start_steps % self.student_steps or ratio & (ratio - 1):
                raise ValueError(f"--start-steps {self.start_steps} is not --student-steps {self.student_steps} times a power of 2; use e.g. --start-steps {self.student_steps * 8}.")
            if self.max_steps < self.phases:
                raise ValueError(f"progressive distillation from {self.start_steps} to {self.student_steps} steps has {self.phases} phases; give --max-steps at least {self.phases}.")
        if self.disc_net != "teacher" and self.method != "add":
            raise ValueError(f"--disc-net is the feature network of --method add's discriminator, and --method {self.method} has none of its own; drop --disc-net"
                             f"{' (ladd reads the teacher itself)' if self.method == 'ladd' else ''}.")  # fmt: skip

    @property
    def phases(self) -> int:
        """Progressive distillation's phases: start_steps, start_steps / 2, ..., student_steps."""
        return max(1, (self.start_steps // self.student_steps).bit_length())


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
    vae: str | None = field(default=None, metadata=option(VAE_HELP + " (latent models)"))
    out: str = field(default="dpo", metadata=option("output folder: adapter/, log.csv, report.json, before.npz / after.npz; must not hold an adapter yet"))
    judge: str | None = field(default=None, metadata=option("Fashion-MNIST classifier weights (safetensors) whose probability of the intended class scores a sample (default: the shipped classifier)"))
    samples_per_class: int = field(default=512, metadata=option("samples drawn per class; each class gives at most half as many (winner, loser) pairs", ge=2))
    min_margin: float = field(default=0.5, metadata=option("drop pairs whose judge scores differ by less (the classifier's scores are probabilities: 0.5 keeps the pairs of a clear winner and a clear loser; 0 keeps all)", ge=0))
    sampler: str | None = field(default=None, metadata=option("sampler of the pair and evaluation samples (default: the model's)", choices=SAMPLERS))
    num_sampling_steps: int | None = field(default=None, metadata=option("sampling steps (default: the model's)", gt=0, le=MAX_SAMPLING_STEPS))
    cfg_scale: float = field(default=1.0, metadata=option("guidance scale of the pair and evaluation samples (1 = unguided, what DPO is meant to improve)", ge=0))
    beta: float = field(default=2500.0, metadata=positive("Diffusion-DPO's beta: how far the adapter may move from the reference (the paper: 5000 for SD 1.5; the loss is in per-element mean squares)"))
    lora_rank: int = field(default=8, metadata=positive("rank of the LoRA adapter"))
    lora_alpha: float | None = field(default=None, metadata=positive("LoRA scale numerator: the update is (alpha / rank) B A (default: the rank)"))
    lora_targets: tuple[str, ...] = field(default=(), metadata=option(LORA_TARGETS_HELP))
    steps: int = field(default=1000, metadata=positive("optimizer steps"))
    batch_size: int = field(default=16, metadata=positive("pairs per step"))
    lr: float = field(default=2e-4, metadata=positive("AdamW learning rate of the adapter"))
    seed: int = field(default=0, metadata=option("seed of the samples, the pairs' order, times and noise", ge=0))
    eval_samples: int = field(default=2000, metadata=nonnegative("unguided samples (classes cycled) scored before and after: class accuracy, and FD-EffNet against the Fashion-MNIST test split above 1280; 0 = skip"))
    sample_batch_size: int = field(default=64, metadata=positive("samples per model batch while sampling (on a CPU, small batches stay in cache and run faster)"))
    log_every: int = field(default=10, metadata=positive("log the loss, implicit accuracy and reward margin every N steps"))
    device: str = field(default="auto", metadata=option(DEVICE_HELP))

    def check(self) -> None:
        if self.samples_per_class % 2:
            raise ValueError(f"--samples-per-class {self.samples_per_class} is odd; pass an even number (each class splits into winners and losers).")
