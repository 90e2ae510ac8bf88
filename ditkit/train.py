"""`ditkit train`: the paper's recipe from one CPU to many GPU nodes (torchrun), resumable.

The step is the official one (uniform t, eps MSE + VB, AdamW, EMA after every step) with the
speed-ups kept outside the model: bf16 autocast over fp32 master weights, torch.compile,
SDPA attention, gradient checkpointing, fused AdamW, no host syncs inside the step.

Randomness that shapes a step (timesteps, noise, label dropout) is drawn for the whole global
batch from a generator seeded by (seed, step), and each rank takes its slice: a run gives the
same numbers on any number of processes and resumes bitwise, with no RNG state to restore.

A run lives in RESULTS_DIR/NNN-MODEL/ (checkpoints/, model/, samples/, log.csv), a folder made
for it alone. `--init-from` starts from a trained model (fine-tuning); with `--lora-rank` only a
LoRA adapter on that frozen model trains, and the run keeps only the adapter (checkpoints and
RUN/adapter/ in place of model/). `--resume` continues a run in its own folder with the settings its checkpoint
records; every file is written atomically (checkpoints.atomic_write).
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .checkpoints import NoSpaceError, atomic_write, read_pt, remove_temporaries, save_pretrained, torch_save
from .config import DiTConfig, ObjectiveConfig, TrainConfig, field_default
from .data import build_dataset
from .models import DiT, LabelEmbedder
from .objectives import build_objective
from .parallel import barrier, broadcast_object, setup_distributed, shard
from .pipeline import default_sampling

CKPT_RE = re.compile(r"^(\d{7})\.pt$")
LOG_COLUMNS = ("step", "epoch", "loss", "lr", "images_per_s", "elapsed_s")
RUN_RE = re.compile(r"^(\d{3,})-.")  # a run folder: RESULTS_DIR/NNN-MODEL

# Settings a resumed run may change: when it stops, how often it logs and saves, how it runs on
# this machine. Every other setting shapes the numbers and must stay the run's own.
RESUME_FREE = ("max_steps", "max_minutes", "epochs", "log_every", "ckpt_every", "sample_every", "keep_last", "keep_every",
               "default_sampler", "default_steps", "default_cfg_scale", "default_cfg_interval",
               "num_workers", "on_bad_image", "precision", "compile", "grad_checkpointing", "parallel")  # fmt: skip
# Where this command runs and what it resumes: never taken from the checkpoint.
LOCAL_SETTINGS = ("device", "results_dir", "resume")
# Objective settings that define what a network predicts: a fine-tune must keep its base's.
MODEL_OBJECTIVE = ("objective", "path", "time_scale")


class ResumableSampler(Sampler[int]):
    """DistributedSampler's order (shuffled by seed + epoch, padded, strided by rank) that can
    start part-way through an epoch, for exact resume."""

    def __init__(self, n: int, rank: int, world: int, seed: int, local_batch: int):
        self.n, self.rank, self.world, self.seed, self.local_batch = n, rank, world, seed, local_batch
        self.per_rank = math.ceil(n / world)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.local_batch  # drop_last

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank gets as many
        mine = order[self.rank :: self.world]
        return iter(mine[self.start_batch * self.local_batch :])

    def __len__(self) -> int:
        return self.per_rank - self.start_batch * self.local_batch


# -- the step --------------------------------------------------------------------------------
def step_randomness(seed: int, step: int, global_batch: int, shape: tuple, objective, drop_prob: float, device):
    """(t, noise, drop) for the global batch of `step`, identical on every rank; t is drawn by the
    objective (the diffusion's integer steps, the flow's times)."""
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % 2**63)
    t = objective.draw_t(global_batch, generator=g, device=device)
    noise = torch.randn((global_batch, *shape), generator=g, device=device)
    drop = torch.rand(global_batch, generator=g, device=device) < drop_prob
    return t, noise, drop


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 or bf16; "auto" takes bf16 autocast where bf16 matmuls are fast: a CUDA GPU that supports
    them, or a CPU with AMX tiles (there bf16 trains about twice as fast; on CPUs without AMX it
    runs several times slower than fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: absent means unknown
    return "bf16" if device.type == "cpu" and amx is not None and amx() else "fp32"


def learning_rate(cfg: TrainConfig, step: int, total: float) -> float:
    """The lr of 0-based `step`: linear warm-up, then constant or a cosine / linear decay that
    reaches min_lr at the last of `total` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or not math.isfinite(total):
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1.0, total - cfg.warmup_steps - 1))
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1 - frac
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def ema_decay(cfg: TrainConfig, step: int) -> float:
    """The EMA decay after 1-based optimizer step `step`."""
    if cfg.ema_schedule == "warmup":
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    if cfg.ema_schedule == "power":  # EDM2: the average over a fixed fraction of the steps so far
        return (1 - 1 / step) ** (cfg.ema_gamma + 1)
    return cfg.ema_decay


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


class Trainer:
    """Holds the run's state; `run()` trains to the end, checkpointing and logging on the way."""

    def __init__(self, cfg: TrainConfig, model_factory: Callable[[DiTConfig], nn.Module] = DiT):
        """`model_factory` builds the network from the run's DiTConfig: DiT by default. Any module
        with forward(x, t, y) -> (N, C or 2C, H, W) and a `.config` that honours the DiTConfig's
        data fields (input_size, in_channels, num_classes, null_class, learn_sigma) trains as well,
        such as the U-Net baseline of `ditkit study`."""
        self.resume_from, resume_state = None, None
        if cfg.resume:
            self.resume_from = resume_checkpoint(cfg.resume, Path(cfg.results_dir))
            resume_state = read_training_checkpoint(self.resume_from)
            given, cfg = cfg, resume_config(cfg, resume_state["args"], self.resume_from)
        self.base = None  # the --init-from checkpoint
        if cfg.init_from:
            from .checkpoints import read_checkpoint
            from .pipeline import BUNDLED_NAME, find_checkpoint

            base_path = find_checkpoint(cfg.init_from)
            self.base = read_checkpoint(base_path)
            # The adapter records where its base lives: 'bundled' stays a name, other paths absolute.
            self.base_name = BUNDLED_NAME if cfg.init_from == BUNDLED_NAME and not Path(cfg.init_from).exists() else str(base_path.resolve())
            cfg = base_objective(cfg, self.base.meta.get("objective", {"objective": "gaussian"}), base_path)
        self.cfg = cfg
        self.d = setup_distributed(cfg.device)
        if cfg.global_batch_size % self.d.world:
            raise ValueError(f"global batch {cfg.global_batch_size} is not divisible by {self.d.world} processes; use a multiple of {self.d.world}.")
        self.local_batch = cfg.global_batch_size // self.d.world
        self.precision = resolve_precision(cfg.precision, self.d.device)
        if self.d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as the official train.py
            torch.backends.cudnn.allow_tf32 = True

        self.vae = None
        self.grid_vae = None  # the latent store's VAE for sample grids: loaded on first use, False if unavailable
        channels = cfg.channels
        if cfg.vae is not None:
            from .pipeline import load_vae

            self.vae = load_vae(cfg.vae, self.d.device).requires_grad_(False)
            channels = channels or self.vae.config.in_channels  # gray datasets are repeated to RGB
        self.dataset = self.make_dataset(channels)
        if len(self.dataset) < cfg.global_batch_size:
            raise ValueError(f"the dataset has {len(self.dataset)} images, fewer than the global batch {cfg.global_batch_size}; use a smaller --global-batch-size.")
        num_classes = cfg.num_classes or self.dataset.num_classes
        if num_classes < self.dataset.num_classes:
            raise ValueError(f"the data has {self.dataset.num_classes} classes but --num-classes is {num_classes}; raise it or leave it unset.")
        in_channels, input_size = self.dataset.channels, self.dataset.image_size
        if self.vae is not None:
            from .pipeline import vae_factor

            if getattr(self.dataset, "vae", None):
                raise ValueError(f"{cfg.data_path} already holds latents; drop --vae.")
            factor = vae_factor(self.vae)
            if input_size % factor:
                raise ValueError(f"image size {input_size} is not divisible by the VAE's factor {factor}; use a multiple of {factor}.")
            in_channels, input_size = self.vae.config.latent_channels, input_size // factor
        self.model_config = self.make_model_config(num_classes, input_size, in_channels)
        self.objective = build_objective(cfg.objective_config(), learn_sigma=self.model_config.learn_sigma, null_class=getattr(self.model_config, "null_class", None))

        torch.manual_seed(cfg.global_seed)  # the same initial weights on every rank
        self.model = self._build(model_factory).to(self.d.device)
        # Label dropout is drawn by the trainer per global batch; the embedder keeps its null row.
        for m in self.model.modules():
            if isinstance(m, LabelEmbedder):
                m.dropout_prob = 0.0
        self.model.grad_checkpointing = cfg.grad_checkpointing
        self.ema = self._build(model_factory).to(self.d.device).requires_grad_(False).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.fsdp = cfg.parallel == "fsdp" and self.d.world > 1
        if self.fsdp:  # shard before the optimizer sees the parameters
            shard(self.model)
            shard(self.ema)
        fused = self.d.device.type == "cuda"
        # Full runs hand AdamW every parameter, frozen pos_embed included, as saved optimizer states expect.
        trained = [p for p in self.model.parameters() if p.requires_grad] if cfg.lora_rank else self.model.parameters()
        self.opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                                     fused=fused or None)  # fmt: skip
        self.total_steps = float(cfg.max_steps or math.inf)  # the schedule's length; run() knows the epochs too
        torch.manual_seed(cfg.global_seed * self.d.world + self.d.rank)  # per-rank seed (VAE sampling)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.exp_dir = self._experiment_dir()
        if self.d.main:
            for folder in ("", "checkpoints", "model", "adapter", "samples"):
                remove_temporaries(self.exp_dir / folder)  # left by writes that a kill interrupted
        self.last_checkpoint = None  # for the closing message
        if resume_state is not None:
            self._load(resume_state, self.resume_from)
            if self.d.main:
                print(f"resumed from {self.resume_from} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch}) "
                      f"with the run's settings{resume_note(given, cfg, resume_state['args'])}", flush=True)  # fmt: skip
        self.net = self._wrap()
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        ema = dict(self.ema.named_parameters())
        self.ema_params = [ema[n] for n in trainable]  # the EMA follows what trains (a LoRA run: the adapter)

    def _build(self, model_factory: Callable[[DiTConfig], nn.Module]) -> nn.Module:
        """A fresh network; with --init-from, the base's weights, and with --lora-rank a LoRA on them."""
        model = model_factory(self.model_config)
        if self.base is not None:
            from .checkpoints import load_state_strict

            load_state_strict(model, self.base.state, source=f"--init-from {self.base.path}")
        if self.cfg.lora_rank:
            from .lora import add_lora

            add_lora(model, self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_targets, base=self.base_name)
        return model

    # -- setup -----------------------------------------------------------------------------
    def _wrap(self):
        """DDP across processes (FSDP2 shards in place instead), then torch.compile."""
        net = self.model
        if self.d.world > 1 and self.cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(self.model, device_ids=[self.d.device.index] if self.d.device.type == "cuda" else None)
        if self.cfg.compile and hasattr(self.objective, "compile"):
            self.objective.compile()  # MeanFlow's jvp: inside a compiled region, or it runs eagerly
        return torch.compile(net) if self.cfg.compile else net

    def _experiment_dir(self) -> Path:
        """The run folder: the one that owns the checkpoint resumed from, else a new one."""
        if self.resume_from is not None and is_run_checkpoint(self.resume_from):
            return self.resume_from.parent.parent
        path = None
        if self.d.main:
            path = create_run_dir(Path(self.cfg.results_dir), self.run_name())
            if self.resume_from is not None:
                print(f"{self.resume_from} is not in a ditkit run folder (NNN-MODEL/checkpoints/), so the run continues in a new one: {path}", flush=True)
        return Path(broadcast_object(str(path) if path else None, self.d))

    def _load(self, ck: dict, path: Path) -> None:
        if ck.get("model_config") and type(self.model_config)(**ck["model_config"]) != self.model_config:
            now = asdict(self.model_config)
            changed = ", ".join(f"{k} {now[k]} (the run's: {v})" for k, v in ck["model_config"].items() if now.get(k) != v)
            raise ValueError(f"{path} holds another model than these settings and data make ({changed}); resume with the run's data, or start a new run.")
        if ck.get("data_size", len(self.dataset)) != len(self.dataset):
            raise ValueError(f"{self.cfg.data_path} now holds {len(self.dataset)} items, not the {ck['data_size']} the run {path} was trained on, "
                             f"so its saved position (epoch {ck['epoch']}, batch {ck['batch_in_epoch']}) would mean other images; "
                             "restore the data, or start a new run without --resume.")  # fmt: skip
        saved_objective = ck.get("objective", {"objective": "gaussian"})
        if saved_objective != self.objective.config.to_dict():
            raise ValueError(f"{path} was trained with objective {saved_objective}, not {self.objective.config.to_dict()}; resume with the same flags.")
        if self.fsdp:  # full (unsharded) state dicts in, each rank keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, ck["model"], options=opts)
            set_model_state_dict(self.ema, ck["ema"], options=opts)
            set_optimizer_state_dict(self.model, self.opt, ck["opt"], options=opts)
        elif self.cfg.lora_rank:  # the checkpoint holds the adapters; the base came from --init-from
            from .lora import load_lora_state

            load_lora_state(self.model, ck["model"], path)
            load_lora_state(self.ema, ck["ema"], path)
            self.opt.load_state_dict(ck["opt"])
        else:
            self.model.load_state_dict(ck["model"])
            self.ema.load_state_dict(ck["ema"])
            self.opt.load_state_dict(ck["opt"])
        self.step, self.epoch, self.batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        self.load_extra_state(ck)
        self.last_checkpoint = path

    # -- checkpoints -----------------------------------------------------------------------
    def _full_state(self) -> tuple[dict, dict, dict]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=opts), get_model_state_dict(self.ema, options=opts),
                    get_optimizer_state_dict(self.model, self.opt, options=opts))  # fmt: skip
        if self.cfg.lora_rank:  # the frozen base is --init-from's: checkpoints hold only what trains
            from .lora import lora_state

            return lora_state(self.model), lora_state(self.ema), self.opt.state_dict()
        return self.model.state_dict(), self.ema.state_dict(), self.opt.state_dict()

    def save(self) -> Path:
        """The training checkpoint, then the EMA as the model folder; a full disk stops the run
        with the newest complete checkpoint named."""
        model, ema, opt = self._full_state()  # collective under FSDP: every rank takes part
        path = self.exp_dir / "checkpoints" / f"{self.step:07d}.pt"
        if self.d.main:
            recorded = self.recorded()
            state = {
                "model": model, "ema": ema, "opt": opt, "args": asdict(self.cfg), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "data_size": len(self.dataset), "model_config": asdict(self.model_config), **recorded,
                **self.extra_state(),
            }  # fmt: skip
            try:
                atomic_write(path, lambda tmp: torch_save(state, tmp))
                prune_checkpoints(path.parent, self.cfg.keep_last, self.cfg.keep_every)
                if self.cfg.lora_rank:
                    from .lora import save_adapter

                    save_adapter(self.ema, self.exp_dir / "adapter", self.model_config)
                else:
                    save_pretrained(ema, self.ema.config, self.exp_dir / "model", extra={"step": self.step, "data": self.cfg.data_path, **recorded})
            except NoSpaceError as e:
                steps = checkpoint_steps(path.parent)
                kept = f"the last complete checkpoint {path.parent / f'{steps[-1]:07d}.pt'} is intact" if steps else "no checkpoint of this run was written yet"
                raise NoSpaceError(f"{e}: {kept}; free some space, then continue with --resume {self.exp_dir}.") from None
        barrier(self.d)
        self.last_checkpoint = path
        return path

    # -- training --------------------------------------------------------------------------
    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def model_fn(self, x, t, y, **kwargs):
        return self.net(x, t, y, **kwargs).float()  # the loss is computed in float32 under autocast too

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's slice; returns the local mean loss (on device)."""
        cfg, d = self.cfg, self.d
        if self.vae is not None:
            with torch.no_grad():
                x = self.vae.encode(x).latent_dist.sample().mul_(self.vae.config.scaling_factor)
        t, noise, drop = step_randomness(cfg.global_seed, self.step, cfg.global_batch_size, tuple(x.shape[1:]),
                                         self.objective, cfg.class_dropout_prob, d.device)  # fmt: skip
        mine = slice(d.rank, None, d.world)  # rank r holds global batch positions r, r + world, ... (see sampler)
        y = self.condition(y, drop[mine])
        if cfg.warmup_steps or cfg.lr_schedule != "constant":
            for group in self.opt.param_groups:
                group["lr"] = learning_rate(cfg, self.step, self.total_steps)
        with self.autocast():
            loss = self.objective.training_losses(self.model_fn, x, t[mine], noise=noise[mine], y=y)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        self.opt.step()
        update_ema(self.ema_params, self.params, ema_decay(cfg, self.step + 1))
        return loss.detach()

    def loader(self) -> tuple[DataLoader, ResumableSampler]:
        sampler = ResumableSampler(len(self.dataset), self.d.rank, self.d.world, self.cfg.global_seed, self.local_batch)
        loader = DataLoader(self.dataset, batch_size=self.local_batch, sampler=sampler, num_workers=self.cfg.num_workers,
                            pin_memory=self.d.device.type == "cuda", drop_last=True, persistent_workers=False,
                            prefetch_factor=4 if self.cfg.num_workers else None)  # fmt: skip
        return loader, sampler

    def run(self) -> Path:
        cfg, d = self.cfg, self.d
        loader, sampler = self.loader()
        per_epoch = sampler.batches_per_epoch()
        total = self.total_steps = min(cfg.max_steps or math.inf, cfg.epochs * per_epoch)
        self.net.train()
        if d.main:
            print(f"{self.model.config} | {self.dataset} | {sum(p.numel() for p in self.params):,} parameters | "
                  f"{d.world} process(es), global batch {cfg.global_batch_size}, {self.precision}{' + compile' if cfg.compile else ''} | {self.exp_dir}", flush=True)  # fmt: skip
        start_step = self.step
        with contextlib.closing(RunLog(self.exp_dir, d.main, total, self.step)) as log:  # closed on errors too
            running = torch.zeros((), device=d.device)
            n_running = 0
            start = time.perf_counter()
            while self.step < total and self.epoch < cfg.epochs:
                sampler.set_epoch(self.epoch, self.batch_in_epoch)
                self.dataset.set_epoch(self.epoch)
                for x, y in loader:
                    x = x.to(d.device, non_blocking=True)
                    y = y.to(d.device, non_blocking=True)
                    running += self.train_step(x, y)
                    n_running += 1
                    self.step += 1
                    self.batch_in_epoch += 1
                    if self.batch_in_epoch == per_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if self._out_of_time(start):
                        total = self.step  # ends both loops, with the checkpoint of the last step
                    last = self.step >= total
                    if self.step % cfg.log_every == 0 or last or self.step % cfg.ckpt_every == 0:
                        avg = self._reduce(running / n_running)
                        if not math.isfinite(avg):
                            raise FloatingPointError(
                                f"the loss became {avg} by step {self.step}; the last good checkpoint is kept in "
                                f"{self.exp_dir / 'checkpoints'}: lower --lr, use --precision fp32, or resume from it."
                            )
                        log.write(self.step, self.epoch, avg, self.opt.param_groups[0]["lr"], cfg.global_batch_size)
                        running.zero_()
                        n_running = 0
                    if self.step % cfg.ckpt_every == 0 or last:
                        self.save()
                    if cfg.sample_every and (self.step % cfg.sample_every == 0 or last):
                        self.sample_grid()
                    if last:
                        break
        if d.main:
            self._report(total, start_step)
        if d.started:
            dist.destroy_process_group()
        return self.exp_dir

    def _report(self, total: float, start_step: int) -> None:
        """Where the run's results are, once it ends."""
        if self.last_checkpoint is None:
            return
        steps = f" of {int(total)}" if math.isfinite(total) else ""
        if self.step == start_step:
            print(f"the run was already at step {self.step}{steps}; pass a larger --max-steps or --epochs to train it further.", flush=True)
        lines = [f"checkpoint    {self.last_checkpoint}"]
        if self.cfg.lora_rank:
            lines.append(f"adapter       {self.exp_dir / 'adapter'}  (ditkit sample --lora {self.exp_dir / 'adapter'})")
        else:
            lines.append(f"model folder  {self.exp_dir / 'model'}  (ditkit sample --ckpt {self.exp_dir / 'model'})")
        grid = self.exp_dir / "samples" / f"{self.step:07d}.png"
        if grid.exists():
            lines.append(f"sample grid   {grid}")
        print(f"at step {self.step}{steps}:\n  " + "\n  ".join(lines), flush=True)

    def _out_of_time(self, start: float) -> bool:
        """--max-minutes is up: every step in one process; under torchrun rank 0's clock decides at
        log steps, so that every rank stops at the same step."""
        if self.cfg.max_minutes is None or (self.d.world > 1 and self.step % self.cfg.log_every):
            return False
        return broadcast_object(time.perf_counter() - start > 60 * self.cfg.max_minutes, self.d)

    def _reduce(self, value: torch.Tensor) -> float:
        if self.d.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.d.world
        return value.item()

    @torch.no_grad()
    def sample_grid(self) -> None:
        """A grid from the EMA weights (same noise every time, so grids compare across steps).
        Under FSDP every rank takes part in the forwards; rank 0 writes the file."""
        if not (self.d.main or self.fsdp) or self.grid_vae is False:
            return
        from .pipeline import grid_pipeline, load_vae, save_grid, to_uint8

        store_vae = getattr(self.dataset, "vae", None)
        if self.grid_vae is None and store_vae:  # a latent store: decode with the VAE it was made with
            try:
                self.grid_vae = load_vae(store_vae, self.d.device)
            except ValueError as e:
                print(f"no sample grids: {e}", flush=True)
                self.grid_vae = False
                return
        pipe = grid_pipeline(self.ema, self.objective, vae=self.vae or self.grid_vae,
                             precision=self.precision, device=self.d.device)  # fmt: skip
        y, ncol = self.grid_condition()
        g = torch.Generator(device=self.d.device).manual_seed(self.cfg.global_seed)
        x = pipe.images(y, generator=g)
        if self.d.main:
            (self.exp_dir / "samples").mkdir(exist_ok=True)
            save_grid(to_uint8(x), self.exp_dir / "samples" / f"{self.step:07d}.png", ncol=ncol)

    # -- what a subclass (the text-to-image trainer, the distiller) changes -------------------
    def run_name(self) -> str:
        """MODEL in the run folder's name RESULTS_DIR/NNN-MODEL (NNN-lora / NNN-finetune from a base)."""
        if self.base is not None:
            return "lora" if self.cfg.lora_rank else "finetune"
        return self.cfg.model.replace("/", "-")

    def extra_state(self) -> dict:
        """More entries of the training checkpoint, given back to `load_extra_state` on resume."""
        return {}

    def load_extra_state(self, ck: dict) -> None:
        pass

    def make_dataset(self, channels: int | None):
        cfg = self.cfg
        return build_dataset(cfg.data_path, cfg.image_size, channels, flip=cfg.flip, on_bad_image=cfg.on_bad_image, seed=cfg.global_seed)

    def make_model_config(self, num_classes: int, input_size: int, in_channels: int):
        if self.base is not None:
            return base_model_config(self.base, self.cfg, num_classes, input_size, in_channels)
        return self.cfg.model_config(num_classes, input_size, in_channels)

    def condition(self, y: torch.Tensor, drop: torch.Tensor):
        """What the model is conditioned on for this rank's labels y, with `drop` ones made null."""
        return torch.where(drop, self.model_config.null_class, y)

    def recorded(self) -> dict:
        """What checkpoints record beside the weights for sampling."""
        c = self.cfg
        sampling = default_sampling(self.objective, c.default_sampler, c.default_steps, c.default_cfg_scale, c.default_cfg_interval)
        return {"objective": self.objective.config.to_dict(), "sampling": sampling.to_dict()}

    def grid_condition(self):
        """(conditions of the sample grid, its columns): every class up to 10, twice."""
        classes = min(self.model_config.num_classes, 10)
        return torch.arange(classes, device=self.d.device).repeat(2), classes


class RunLog:
    """Progress bar (loss, images/s, ETA) on rank 0, a CSV log, and TensorBoard when installed."""

    def __init__(self, exp_dir: Path, main: bool, total: float, start_step: int):
        self.main = main
        if not main:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=None if math.isinf(total) else int(total), initial=start_step, desc="train", dynamic_ncols=True)
        path = exp_dir / "log.csv"
        if path.exists():
            truncate_log(path, start_step)
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(LOG_COLUMNS)
        self.tb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed run logged after its last checkpoint
            self.tb = SummaryWriter(str(exp_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.start = self.last = time.perf_counter()
        self.last_step = start_step

    def write(self, step: int, epoch: int, loss: float, lr: float, global_batch: int) -> None:
        if not self.main:
            return
        now = time.perf_counter()
        ips = (step - self.last_step) * global_batch / max(now - self.last, 1e-9)
        self.csv.writerow([step, epoch, f"{loss:.6f}", f"{lr:.3g}", f"{ips:.1f}", f"{now - self.start:.1f}"])
        self.file.flush()
        if self.tb is not None:
            self.tb.add_scalar("loss", loss, step)
            self.tb.add_scalar("images_per_s", ips, step)
        self.bar.update(step - self.last_step)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", epoch=epoch)
        self.last, self.last_step = now, step

    def close(self) -> None:
        if self.main:
            self.bar.close()
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop the rows of log.csv after `step` (and a half-written last row): a killed run logged
    them after its last checkpoint, and the resumed run logs those steps again."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if len(r) == len(LOG_COLUMNS) and r[0].isdigit() and int(r[0]) <= step]
    if keep != rows:

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(keep)

        atomic_write(path, write)


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.glob("*.pt") if (m := CKPT_RE.match(p.name)))


def prune_checkpoints(folder: Path, keep_last: int, keep_every: int | None) -> None:
    steps = checkpoint_steps(folder)
    for s in steps[:-keep_last]:
        if not (keep_every and s % keep_every == 0):
            (folder / f"{s:07d}.pt").unlink(missing_ok=True)


def run_folders(results_dir: Path) -> list[Path]:
    """The run folders (NNN-MODEL) under `results_dir`, oldest (lowest NNN) first."""
    if not results_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in results_dir.iterdir() if (m := RUN_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def create_run_dir(results_dir: Path, name: str) -> Path:
    """results_dir/NNN-name/checkpoints, NNN one past the highest index there, the run folder made
    exclusively: a new run never writes into an existing folder, not even one that a run started
    at the same instant has just made."""
    results_dir.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(m.group(1)) for p in results_dir.iterdir() if (m := RUN_RE.match(p.name))]
        path = results_dir / f"{max(taken, default=-1) + 1:03d}-{name}"
        try:
            path.mkdir()
        except FileExistsError:
            continue  # another run took this index after the scan: scan again
        (path / "checkpoints").mkdir()
        return path


def is_run_checkpoint(path: Path) -> bool:
    """Whether `path` is RESULTS_DIR/NNN-MODEL/checkpoints/NNNNNNN.pt, inside the run that wrote it."""
    return bool(CKPT_RE.match(path.name)) and path.parent.name == "checkpoints" and bool(RUN_RE.match(path.parent.parent.name))


def latest_checkpoint(results_dir: Path) -> Path | None:
    """The newest checkpoint of the newest run under `results_dir` that has one."""
    for run in reversed(run_folders(results_dir)):
        steps = checkpoint_steps(run / "checkpoints")
        if steps:
            return run / "checkpoints" / f"{steps[-1]:07d}.pt"
    return None


def resume_checkpoint(resume: str, results_dir: Path) -> Path:
    """The checkpoint --resume names: 'latest' (under results_dir), a run folder (its newest) or a file."""
    if resume == "latest":
        found = latest_checkpoint(results_dir)
        if found is None:
            raise FileNotFoundError(f"no checkpoint to resume under {results_dir}; train without --resume first.")
        return found
    path = Path(resume)
    if path.is_dir():
        steps = checkpoint_steps(path / "checkpoints")
        if not steps:
            raise FileNotFoundError(f"{path} holds no checkpoints/NNNNNNN.pt; pass a run folder of ditkit train, a checkpoint or 'latest'.")
        return path / "checkpoints" / f"{steps[-1]:07d}.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} to resume from does not exist; pass a checkpoint, a run folder or 'latest'.")
    return path


def read_training_checkpoint(path: Path) -> dict:
    ck = read_pt(path)
    for key in ("model", "ema", "opt", "step", "args"):
        if not isinstance(ck, dict) or key not in ck:
            raise ValueError(f"{path} has no {key!r}: it is not a ditkit training checkpoint; pass one from RESULTS_DIR/NNN-MODEL/checkpoints.")
    if not isinstance(ck["args"], dict):
        raise ValueError(f"{path} does not record ditkit's settings: it is not a ditkit training checkpoint; pass one from RESULTS_DIR/NNN-MODEL/checkpoints.")
    return ck


def resume_config(cfg, saved: dict, source: Path, free: tuple[str, ...] = RESUME_FREE):
    """The settings of the run that `source` continues (a TrainConfig, or another config of the same
    kind): the saved ones, except where `cfg` gives a value other than the default, which may change
    only the `free` settings (a differing value of any other setting is refused, naming the flag).
    So a bare --resume continues the run."""
    cls = type(cfg)
    merged, conflicts = {}, []
    for f in fields(cls):
        now = getattr(cfg, f.name)
        if f.name in LOCAL_SETTINGS or f.name not in saved:
            merged[f.name] = now
        elif now == saved[f.name] or now == field_default(cls, f.name):
            merged[f.name] = saved[f.name]
        elif f.name in free:
            merged[f.name] = now
        else:
            conflicts.append(f"--{f.name.replace('_', '-')} {now} (the run's: {saved[f.name]})")
    if conflicts:
        raise ValueError(f"{source} was trained with other settings: {'; '.join(conflicts)}; drop those flags to continue the run, "
                         "or leave out --resume to start a new one.")  # fmt: skip
    return cls(**merged)


def resume_note(given: TrainConfig, merged: TrainConfig, saved: dict) -> str:
    """" (from the run: depth 1, ...; changed: max_steps 4 -> 8)": what a resume took from the
    checkpoint beyond this command's values, and what this command changed."""
    now = asdict(merged)
    kept = [f"{k} {v}" for k, v in now.items() if k not in LOCAL_SETTINGS and v != getattr(given, k)]
    changed = [f"{k} {saved[k]} -> {v}" for k, v in now.items() if k in RESUME_FREE and k in saved and saved[k] != v]
    parts = [f"from the run: {', '.join(kept)}"] * bool(kept) + [f"changed: {', '.join(changed)}"] * bool(changed)
    return f" ({'; '.join(parts)})" if parts else ""


def base_objective(cfg: TrainConfig, recorded: dict, source: Path) -> TrainConfig:
    """`cfg` with the --init-from model's objective settings wherever a flag is at its default; a
    flag that would change what the network predicts is refused in one sentence."""
    base = ObjectiveConfig(**recorded)
    merged = {}
    for f in fields(ObjectiveConfig):
        now, theirs = getattr(cfg, f.name), getattr(base, f.name)
        if now == field_default(TrainConfig, f.name):
            merged[f.name] = theirs
        elif f.name in MODEL_OBJECTIVE and now != theirs:
            raise ValueError(f"--init-from {source} is a model with {f.name} {theirs}; drop --{f.name.replace('_', '-')} {now} to fine-tune it.")
    return replace(cfg, **merged)


def base_model_config(base, cfg: TrainConfig, num_classes: int, input_size: int, in_channels: int) -> DiTConfig:
    """The --init-from model's config, after checking that the data fits it (one sentence if not)."""
    from .checkpoints import infer_config
    from .config import MMDiTConfig

    c = base.config or infer_config(base.state)
    if c is None or isinstance(c, MMDiTConfig):
        raise ValueError(f"--init-from {base.path} is not a class-conditional DiT; pass a DiT model folder, run folder or checkpoint.")
    if (in_channels, input_size) != (c.in_channels, c.input_size):
        raise ValueError(f"{cfg.data_path} gives {in_channels}-channel inputs of {input_size}x{input_size}, but --init-from {base.path} "
                         f"takes {c.in_channels}-channel {c.input_size}x{c.input_size}; pass --image-size and --channels to match it.")  # fmt: skip
    if num_classes > c.num_classes or (cfg.num_classes is not None and cfg.num_classes != c.num_classes):
        raise ValueError(f"the data has {num_classes} classes but --init-from {base.path} has {c.num_classes}; a fine-tune keeps its base's "
                         f"classes, so use data with at most {c.num_classes} classes (and leave --num-classes unset).")  # fmt: skip
    return c


def run_train(cfg: TrainConfig) -> Path:
    if cfg.text:
        from .train_text import TextTrainer

        return TextTrainer(cfg).run()
    return Trainer(cfg).run()

