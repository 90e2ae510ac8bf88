"""`ditkit train`: the paper's recipe from one CPU to many GPU nodes (torchrun), resumable.

The step is the official one (uniform t, eps MSE + VB, AdamW, EMA after every step) with the
speed-ups kept outside the model: bf16 autocast over fp32 master weights, torch.compile,
SDPA attention, gradient checkpointing, fused AdamW, no host syncs inside the step.

Randomness that shapes a step (timesteps, noise, label dropout) is drawn for the whole global
batch from a generator seeded by (seed, step), and each rank takes its slice: a run gives the
same numbers on any number of processes and resumes bitwise, with no RNG state to restore.
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .checkpoints import atomic_write, read_pt, save_pretrained
from .config import DiTConfig, TrainConfig
from .data import build_dataset
from .models import DiT, LabelEmbedder
from .objectives import build_objective
from .parallel import broadcast_object, setup_distributed, shard
from .pipeline import default_sampling

CKPT_RE = re.compile(r"^(\d{7})\.pt$")


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
        self.cfg = cfg
        self.d = setup_distributed(cfg.device)
        if cfg.global_batch_size % self.d.world:
            raise ValueError(f"global batch {cfg.global_batch_size} is not divisible by {self.d.world} processes; use a multiple of {self.d.world}.")
        self.local_batch = cfg.global_batch_size // self.d.world
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
        self.objective = build_objective(cfg.objective_config(), learn_sigma=self.model_config.learn_sigma)

        torch.manual_seed(cfg.global_seed)  # the same initial weights on every rank
        self.model = model_factory(self.model_config).to(self.d.device)
        # Label dropout is drawn by the trainer per global batch; the embedder keeps its null row.
        for m in self.model.modules():
            if isinstance(m, LabelEmbedder):
                m.dropout_prob = 0.0
        self.model.grad_checkpointing = cfg.grad_checkpointing
        self.ema = model_factory(self.model_config).to(self.d.device).requires_grad_(False).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.fsdp = cfg.parallel == "fsdp" and self.d.world > 1
        if self.fsdp:  # shard before the optimizer sees the parameters
            shard(self.model)
            shard(self.ema)
        fused = self.d.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                                     fused=fused or None)  # fmt: skip
        self.total_steps = float(cfg.max_steps or math.inf)  # the schedule's length; run() knows the epochs too
        torch.manual_seed(cfg.global_seed * self.d.world + self.d.rank)  # per-rank seed (VAE sampling)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.exp_dir = self._experiment_dir()
        if cfg.resume:
            self._load(self._resume_path())
        self.net = self._wrap()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = [p for n, p in self.ema.named_parameters() if n != "pos_embed"]
        assert len(self.params) == len(self.ema_params)

    # -- setup -----------------------------------------------------------------------------
    def _wrap(self):
        """DDP across processes (FSDP2 shards in place instead), then torch.compile."""
        net = self.model
        if self.d.world > 1 and self.cfg.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(self.model, device_ids=[self.d.device.index] if self.d.device.type == "cuda" else None)
        return torch.compile(net) if self.cfg.compile else net

    def _experiment_dir(self) -> Path:
        root = Path(self.cfg.results_dir)
        if self.cfg.resume:
            return self._resume_path().parent.parent
        path = None
        if self.d.main:
            root.mkdir(parents=True, exist_ok=True)
            index = len([p for p in root.iterdir() if p.is_dir()])
            path = root / f"{index:03d}-{self.cfg.model.replace('/', '-')}"
            (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        return Path(broadcast_object(str(path) if path else None, self.d))

    def _resume_path(self) -> Path:
        if self.cfg.resume != "latest":
            path = Path(self.cfg.resume)
            if not path.exists():
                raise FileNotFoundError(f"checkpoint {path} to resume from does not exist; pass a path or 'latest'.")
            return path
        found = latest_checkpoint(Path(self.cfg.results_dir))
        if found is None:
            raise FileNotFoundError(f"no checkpoint to resume under {self.cfg.results_dir}; train without --resume first.")
        return found

    def _load(self, path: Path) -> None:
        ck = read_pt(path)
        for key in ("model", "ema", "opt", "step"):
            if key not in ck:
                raise ValueError(f"{path} has no {key!r}: it is not a ditkit training checkpoint; pass one from RESULTS_DIR/.../checkpoints.")
        if ck.get("model_config") and type(self.model_config)(**ck["model_config"]) != self.model_config:
            raise ValueError(f"{path} was trained with a different model config ({ck['model_config']}); resume with the same flags.")
        saved_objective = ck.get("objective", {"objective": "gaussian"})
        if saved_objective != self.objective.config.to_dict():
            raise ValueError(f"{path} was trained with objective {saved_objective}, not {self.objective.config.to_dict()}; resume with the same flags.")
        if self.fsdp:  # full (unsharded) state dicts in, each rank keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, ck["model"], options=opts)
            set_model_state_dict(self.ema, ck["ema"], options=opts)
            set_optimizer_state_dict(self.model, self.opt, ck["opt"], options=opts)
        else:
            self.model.load_state_dict(ck["model"])
            self.ema.load_state_dict(ck["ema"])
            self.opt.load_state_dict(ck["opt"])
        self.step, self.epoch, self.batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        if self.d.main:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})", flush=True)

    # -- checkpoints -----------------------------------------------------------------------
    def _full_state(self) -> tuple[dict, dict, dict]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=opts), get_model_state_dict(self.ema, options=opts),
                    get_optimizer_state_dict(self.model, self.opt, options=opts))  # fmt: skip
        return self.model.state_dict(), self.ema.state_dict(), self.opt.state_dict()

    def save(self) -> Path | None:
        model, ema, opt = self._full_state()  # collective under FSDP: every rank takes part
        path = self.exp_dir / "checkpoints" / f"{self.step:07d}.pt"
        if self.d.main:
            recorded = self.recorded()
            state = {
                "model": model, "ema": ema, "opt": opt, "args": asdict(self.cfg), "step": self.step,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "model_config": asdict(self.model_config), **recorded,
            }  # fmt: skip
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            prune_checkpoints(path.parent, self.cfg.keep_last, self.cfg.keep_every)
            save_pretrained(ema, self.ema.config, self.exp_dir / "model", extra={"step": self.step, "data": self.cfg.data_path, **recorded})
        if self.d.world > 1:
            dist.barrier()
        return path

    # -- training --------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def model_fn(self, x, t, y):
        return self.net(x, t, y).float()  # the loss is computed in float32 under autocast too

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
                  f"{d.world} process(es), global batch {cfg.global_batch_size} | {self.exp_dir}", flush=True)  # fmt: skip
        log = RunLog(self.exp_dir, d.main, total, self.step)
        running = torch.zeros((), device=d.device)
        n_running = 0
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
        log.close()
        if d.started:
            dist.destroy_process_group()
        return self.exp_dir

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
                             precision="bf16" if self.cfg.precision == "bf16" else "fp32", device=self.d.device)  # fmt: skip
        y, ncol = self.grid_condition()
        g = torch.Generator(device=self.d.device).manual_seed(self.cfg.global_seed)
        x = pipe.images(y, generator=g)
        if self.d.main:
            (self.exp_dir / "samples").mkdir(exist_ok=True)
            save_grid(to_uint8(x), self.exp_dir / "samples" / f"{self.step:07d}.png", ncol=ncol)

    # -- what a subclass (the text-to-image trainer) changes ---------------------------------
    def make_dataset(self, channels: int | None):
        cfg = self.cfg
        return build_dataset(cfg.data_path, cfg.image_size, channels, flip=cfg.flip, on_bad_image=cfg.on_bad_image, seed=cfg.global_seed)

    def make_model_config(self, num_classes: int, input_size: int, in_channels: int):
        return self.cfg.model_config(num_classes, input_size, in_channels)

    def condition(self, y: torch.Tensor, drop: torch.Tensor):
        """What the model is conditioned on for this rank's labels y, with `drop` ones made null."""
        return torch.where(drop, self.model_config.null_class, y)

    def recorded(self) -> dict:
        """What checkpoints record beside the weights for sampling."""
        return {"objective": self.objective.config.to_dict(), "sampling": default_sampling(self.objective).to_dict()}

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
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(["step", "epoch", "loss", "lr", "images_per_s", "elapsed_s"])
        self.tb = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(exp_dir / "tb"))
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


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.glob("*.pt") if (m := CKPT_RE.match(p.name)))


def prune_checkpoints(folder: Path, keep_last: int, keep_every: int | None) -> None:
    steps = checkpoint_steps(folder)
    for s in steps[:-keep_last]:
        if not (keep_every and s % keep_every == 0):
            (folder / f"{s:07d}.pt").unlink(missing_ok=True)


def latest_checkpoint(results_dir: Path) -> Path | None:
    """The newest checkpoint of the newest experiment under `results_dir`."""
    if not results_dir.exists():
        return None
    for exp in sorted((p for p in results_dir.iterdir() if p.is_dir()), reverse=True):
        steps = checkpoint_steps(exp / "checkpoints")
        if steps:
            return exp / "checkpoints" / f"{steps[-1]:07d}.pt"
    return None


def run_train(cfg: TrainConfig) -> Path:
    if cfg.text:
        from .train_text import TextTrainer

        return TextTrainer(cfg).run()
    return Trainer(cfg).run()

