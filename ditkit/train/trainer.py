"""The training loop, assembled from parts (builders, resume, schedule, log, a task).

The step is the official one (uniform t, eps MSE + VB, AdamW, EMA after every step) with the
speed-ups kept outside the model: bf16 autocast over fp32 master weights, torch.compile,
SDPA attention, gradient checkpointing, fused AdamW, no host syncs inside the step.

Randomness that shapes a step (timesteps, noise, label dropout) is drawn for the whole global
batch from a generator seeded by (seed, step), and each rank takes its slice: a run gives the
same numbers on any number of processes and resumes bitwise, with no RNG state to restore.

A run lives in RESULTS_DIR/NNN-MODEL/ (checkpoints/, model/, samples/, log.csv), a folder made
for it alone. `--init-from` starts from a trained model (fine-tuning); with `--lora-rank` only a
LoRA adapter on that frozen model trains, and the run keeps only the adapter (checkpoints and
RUN/adapter/ in place of model/). `--resume` continues a run in its own folder with the settings
its checkpoint records; every file is written atomically.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoints import save_pretrained
from ..config import TrainConfig
from ..lora import load_lora_state, lora_state, save_adapter
from ..objectives import build_objective
from ..parallel import barrier, broadcast_object, setup_distributed, shard, wrap
from ..pipeline import default_sampling, grid_pipeline
from ..text.task import TextTask
from ..utils.devices import autocast, resolve_precision
from ..utils.images import save_grid, to_uint8
from ..utils.io import NoSpaceError, atomic_write, remove_temporaries, torch_save
from ..utils.runs import checkpoint_steps, lock_run, prune_checkpoints
from ..utils.vae import load_vae
from ..video.task import TextVideoTask, VideoTask
from .builders import build_ema, build_loader, build_network, build_optimizer, build_run_dir, build_vae, check_network_size, data_shape, total_steps
from .log import RunLog
from .posthoc import save_snapshot, sigma_to_gamma
from .resume import resolve_base, resolve_resume
from .schedule import ema_decay, fitted_total, learning_rate, power_decay, step_randomness, update_ema
from .tasks import ClassTask


class Trainer:
    """Holds the run's state; `run()` trains to the end, checkpointing and logging on the way."""

    def __init__(self, cfg: TrainConfig, task=None):
        """`task` says what trains (see ditkit.train.tasks): a class-conditional DiT by default, an
        MMDiT for MMDiT presets, a video DiT for VDiT presets; the study passes one that builds a
        U-Net, ditkit distill its own."""
        cfg, self.resume_from, resume_state, note = resolve_resume(cfg)
        cfg, self.base, self.base_name = resolve_base(cfg)
        self.cfg, self.task = cfg, task or (TextVideoTask(cfg) if cfg.text and cfg.video else TextTask(cfg) if cfg.text else VideoTask() if cfg.video else ClassTask())
        self.d = d = setup_distributed(cfg.device)
        if cfg.global_batch_size % d.world:
            raise ValueError(f"global batch {cfg.global_batch_size} is not divisible by {d.world} processes; use a multiple of {d.world}.")
        self.local_batch = cfg.global_batch_size // d.world
        self.precision = resolve_precision(cfg.precision, d.device)
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # as the official train.py
            torch.backends.cudnn.allow_tf32 = True

        self.vae = build_vae(cfg, d.device)
        self.grid_vae = None  # a latent store's VAE for sample grids: loaded on first use, False if unavailable
        self.dataset = self.task.dataset(cfg, cfg.channels or (self.vae.config.in_channels if self.vae else None), d)  # gray data goes RGB for a VAE
        self.model_config = self.task.model_config(cfg, *data_shape(self.dataset, self.vae, cfg), self.base)
        check_network_size(self.model_config, cfg, d.device, self.local_batch)  # before anything is built
        self.objective = build_objective(cfg.objective_config(), learn_sigma=self.model_config.learn_sigma,
                                         null_class=getattr(self.model_config, "null_class", None))  # fmt: skip

        torch.manual_seed(cfg.global_seed)  # the same initial weights on every rank
        make = lambda: build_network(self.task.build, self.model_config, cfg, self.base, self.base_name).to(d.device)  # noqa: E731
        self.model = make()
        self.model.grad_checkpointing = cfg.grad_checkpointing
        self.ema = build_ema(self.model, make)
        self.profiles = {sigma: build_ema(self.model, make) for sigma in cfg.ema_profiles}  # post-hoc EMA's power EMAs, by width
        self.fsdp = cfg.parallel == "fsdp" and d.world > 1
        if self.fsdp:  # shard before the optimizer sees the parameters
            shard(self.model)
            shard(self.ema)
        self.opt = build_optimizer(self.model, cfg, d.device)
        self.total_steps = float(cfg.max_steps or math.inf)  # the schedule's length; run() knows the epochs too
        torch.manual_seed(cfg.global_seed * d.world + d.rank)  # per-rank seed (VAE sampling)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.exp_dir = build_run_dir(cfg, d, self.task.run_name(cfg, self.base), self.resume_from)
        self.lock = lock_run(self.exp_dir) if d.main else None  # the run is this process's until run() ends
        if d.main:
            for folder in ("", "checkpoints", "model", "adapter", "samples"):
                remove_temporaries(self.exp_dir / folder)  # left by writes that a kill interrupted
        self.last_checkpoint = None  # for the closing message
        if resume_state is not None:
            try:
                self._load(resume_state, self.resume_from)
            except BaseException:
                self.release()
                raise
            if d.main:
                print(f"resumed from {self.resume_from} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch}) "
                      f"with the run's settings{note}", flush=True)  # fmt: skip
        self.net = wrap(self.model, d, cfg.parallel, cfg.compile)
        if cfg.compile and hasattr(self.objective, "compile"):
            self.objective.compile()  # MeanFlow's jvp: inside a compiled region, or it runs eagerly
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        ema = dict(self.ema.named_parameters())
        self.ema_params = [ema[n] for n in trainable]  # the EMA follows what trains (a LoRA run: the adapter)
        self.profile_params = [(sigma_to_gamma(sigma), [dict(m.named_parameters())[n] for n in trainable]) for sigma, m in self.profiles.items()]

    # -- checkpoints -----------------------------------------------------------------------
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
            load_lora_state(self.model, ck["model"], path)
            load_lora_state(self.ema, ck["ema"], path)
            self.opt.load_state_dict(ck["opt"])
        else:
            self.model.load_state_dict(ck["model"])
            self.ema.load_state_dict(ck["ema"])
            self.opt.load_state_dict(ck["opt"])
            for sigma, m in self.profiles.items():
                m.load_state_dict(ck["ema_profiles"][f"{sigma:g}"])
        self.step, self.epoch, self.batch_in_epoch = ck["step"], ck["epoch"], ck["batch_in_epoch"]
        if hasattr(self.task, "load_state"):
            self.task.load_state(self, ck)
        self.last_checkpoint = path

    def _full_state(self) -> tuple[dict, dict, dict]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=opts), get_model_state_dict(self.ema, options=opts),
                    get_optimizer_state_dict(self.model, self.opt, options=opts))  # fmt: skip
        if self.cfg.lora_rank:  # the frozen base is --init-from's: checkpoints hold only what trains
            return lora_state(self.model), lora_state(self.ema), self.opt.state_dict()
        return self.model.state_dict(), self.ema.state_dict(), self.opt.state_dict()

    def recorded(self) -> dict:
        """What checkpoints and the model folder record beside the weights, for sampling."""
        c = self.cfg
        sampling = default_sampling(self.objective, c.default_sampler, c.default_steps, c.default_cfg_scale, c.default_cfg_interval)
        return {"objective": self.objective.config.to_dict(), "sampling": sampling.to_dict(), **self.task.recorded(c)}

    def save(self) -> Path:
        """The training checkpoint, then the EMA as the model folder; a full disk stops the run
        with the newest complete checkpoint named."""
        model, ema, opt = self._full_state()  # collective under FSDP: every rank takes part
        path = self.exp_dir / "checkpoints" / f"{self.step:07d}.pt"
        if self.d.main:
            recorded = self.recorded()
            extra = self.task.state(self) if hasattr(self.task, "state") else {}
            state = {
                "model": model, "ema": ema, "opt": opt, "args": self.cfg.flat(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "data_size": len(self.dataset), "model_config": asdict(self.model_config), **recorded,
                **extra,
            }  # fmt: skip
            if self.profiles:
                state["ema_profiles"] = {f"{sigma:g}": m.state_dict() for sigma, m in self.profiles.items()}
            try:
                atomic_write(path, lambda tmp: torch_save(state, tmp))
                prune_checkpoints(path.parent, self.cfg.keep_last, self.cfg.keep_every)
                if self.cfg.lora_rank:
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
        return autocast(self.d.device, self.precision)

    def model_fn(self, x, t, y, **kwargs):
        return self.net(x, t, y, **kwargs).float()  # the loss is computed in float32 under autocast too

    def denoising_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The objective's loss on this rank's slice of the global batch (the paper's step)."""
        cfg, d = self.cfg, self.d
        t, noise, drop = step_randomness(cfg.global_seed, self.step, cfg.global_batch_size, tuple(x.shape[1:]),
                                         self.objective, cfg.class_dropout_prob, d.device)  # fmt: skip
        mine = slice(d.rank, None, d.world)  # rank r holds global batch positions r, r + world, ... (see ResumableSampler)
        cond = self.task.condition(y, drop[mine], self.model_config)
        return self.objective.training_losses(self.model_fn, x, t[mine], noise=noise[mine], y=cond)["loss"].mean()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's slice; returns the local mean loss (on device)."""
        cfg = self.cfg
        if self.vae is not None:
            with torch.no_grad():
                x = self.vae.encode(x).latent_dist.sample().mul_(self.vae.config.scaling_factor)
        if cfg.warmup_steps or cfg.lr_schedule != "constant":
            for group in self.opt.param_groups:
                group["lr"] = learning_rate(cfg.optim, self.step, self.total_steps)
        with self.autocast():
            loss = self.task.loss(self, x, y) if hasattr(self.task, "loss") else self.denoising_loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        self.opt.step()
        update_ema(self.ema_params, self.params, ema_decay(cfg.ema, self.step + 1))
        for gamma, params in self.profile_params:
            update_ema(params, self.params, power_decay(gamma, self.step + 1))
        if hasattr(self.task, "after_step"):
            self.task.after_step(self)
        return loss.detach()

    def loader(self):
        """(DataLoader, ResumableSampler) of this rank's share of every global batch."""
        return build_loader(self.dataset, self.d, self.cfg, self.local_batch)

    def release(self) -> None:
        """Give the run folder back (another process may resume it now)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def run(self) -> Path:
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> Path:
        cfg, d = self.cfg, self.d
        if hasattr(self.task, "prepare"):
            self.task.prepare(self)
        loader, sampler = self.loader()
        per_epoch = sampler.batches_per_epoch()
        total = self.total_steps = total_steps(cfg, per_epoch)
        self.net.train()
        if d.main:
            print(f"{self.model.config} | {self.dataset} | {sum(p.numel() for p in self.params):,} parameters | "
                  f"{d.world} process(es), global batch {cfg.global_batch_size}, {self.precision}{' + compile' if cfg.compile else ''} | {self.exp_dir}", flush=True)  # fmt: skip
        start_step = self.step
        with contextlib.closing(RunLog(self.exp_dir, d.main, total, self.step)) as log:  # closed on errors too
            running = torch.zeros((), device=d.device)
            n_running = 0
            start = time.perf_counter()
            anchor = None  # (step, seconds) of the first log step, from which --fit-to-minutes measures the speed
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
                    if cfg.fit_to_minutes and self.step % cfg.log_every == 0 and not last:
                        anchor = self._fit_schedule(start, anchor, total)
                    if self.step % cfg.log_every == 0 or last or self.step % cfg.ckpt_every == 0:
                        avg = self._reduce(running / n_running)
                        if not math.isfinite(avg):
                            raise FloatingPointError(self._diverged(avg))
                        log.write(self.step, self.epoch, avg, self.opt.param_groups[0]["lr"], cfg.global_batch_size)
                        running.zero_()
                        n_running = 0
                    if self.profiles and d.main and (self.step % cfg.ema_snapshot_every == 0 or last):
                        for sigma, m in self.profiles.items():
                            save_snapshot(self.exp_dir, sigma, self.step, m.state_dict())
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
            further = getattr(self.task, "further", "pass a larger --max-steps or --epochs to train it further")
            print(f"the run was already at step {self.step}{steps}; {further}.", flush=True)
        lines = [f"checkpoint    {self.last_checkpoint}"]
        if self.cfg.lora_rank:
            lines.append(f"adapter       {self.exp_dir / 'adapter'}  (ditkit sample --lora {self.exp_dir / 'adapter'})")
        else:
            lines.append(f"model folder  {self.exp_dir / 'model'}  (ditkit sample --ckpt {self.exp_dir / 'model'})")
        for grid in sorted((self.exp_dir / "samples").glob(f"{self.step:07d}.*")):
            lines.append(f"sample grid   {grid}")
        print(f"at step {self.step}{steps}:\n  " + "\n  ".join(lines), flush=True)

    def _diverged(self, loss: float) -> str:
        """Why the run stops at a NaN or infinite loss, and what on disk it can go on from."""
        steps = checkpoint_steps(self.exp_dir / "checkpoints")
        fp32 = " --precision fp32" if self.precision != "fp32" else ""
        if not steps:
            return f"the loss became {loss} by step {self.step} and no checkpoint of this run was written yet; start again with a lower --lr{fp32 and ' or' + fp32}."
        newest = self.exp_dir / "checkpoints" / f"{steps[-1]:07d}.pt"
        return (f"the loss became {loss} by step {self.step}; the newest checkpoint, {newest} (step {steps[-1]}), is intact: "
                f"continue from it with --resume {self.exp_dir}{fp32}, or start again with a lower --lr.")  # fmt: skip

    def _fit_schedule(self, start: float, anchor: tuple[int, float] | None, total: float) -> tuple[int, float]:
        """--fit-to-minutes: move the lr schedule's end to the step the clock will stop at (rank 0's
        clock, so that every rank takes the same learning rate); returns the anchor of the speed."""
        elapsed = time.perf_counter() - start
        if anchor is None:
            return (self.step, elapsed)
        fitted = fitted_total(self.step, elapsed, anchor, self.cfg.max_minutes, total)
        self.total_steps = broadcast_object(fitted, self.d)
        return anchor

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
        y, ncol = self.task.grid_condition(self.dataset, self.model_config, self.d.device)
        g = torch.Generator(device=self.d.device).manual_seed(self.cfg.global_seed)
        if self.d.main:  # tens of seconds on a CPU: say what runs
            print(f"sample grid at step {self.step}: {len(y)} images, {pipe.sampling.describe()}", flush=True)
        x = pipe.images(y, generator=g, progress=self.d.main)
        if self.d.main:
            (self.exp_dir / "samples").mkdir(exist_ok=True)
            write = getattr(self.task, "save_grid", save_grid)  # a video task animates its grid
            write(to_uint8(x), self.exp_dir / "samples" / f"{self.step:07d}.png", ncol=ncol)


def run_train(cfg: TrainConfig) -> Path:
    return Trainer(cfg).run()
