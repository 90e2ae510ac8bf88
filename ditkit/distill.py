"""`ditkit distill`: students of a flow-matching teacher that need fewer network evaluations.

guidance     The student takes the guidance scale w as an input (DiTConfig.cfg_embed) and learns the
             teacher's guided velocity v_null + w (v_cond - v_null) at the teacher's training points
             (data interpolated with noise at the teacher's training times), w uniform in --cfg-range:
             guided sampling in one pass of N instead of one of 2N.
progressive  Salimans & Ho (2022) on the velocity ODE: a student of N Euler steps learns to go in one
             step where its teacher goes in two, N halving per phase from --start-steps down to
             --student-steps. The first phase's teacher is the guided teacher (Heun, or Euler if that
             is its sampler) at its own scale and interval, so the students need no guidance; each
             later phase's teacher is the previous phase's student (its EMA, kept in the checkpoint).
reflow       Liu et al. (2023): (noise, sample) pairs from the guided teacher at its own sampler,
             cached in the run folder (a resume reuses them), and flow matching on the straight line
             between them; the last --one-step-share of the steps put half of each batch at t = 0,
             where one Euler step is the whole map.

Each method is a task of ditkit train's Trainer (`Distillation`: the student, its data and its
loss), so the run folder, log.csv, atomic checkpoints, EMA, exact resume and the model/ folder are
ditkit train's. The randomness of a step is drawn for the global batch from (seed, step), so a
resumed run continues with the same numbers.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .checkpoints import infer_config, load_model, read_checkpoint, save_pretrained
from .config import DiTConfig, DistillConfig, ObjectiveConfig, Sampling, SamplingOptions, TrainConfig
from .models import DiT
from .objectives import FlowMatching, build_objective
from .objectives.common import expand_to, mean_flat
from .parallel import barrier
from .pipeline import resolve_sampling
from .samplers import sample
from .train import ClassTask, Trainer
from .train.resume import resume_config
from .utils.devices import resolve_device
from .utils.io import atomic_write, read_pt, safetensors_save
from .utils.runs import find_checkpoint, resume_checkpoint

# Settings a resumed distillation may change; the others shape the numbers (max_steps places the phases).
RESUME_FREE = ("max_minutes", "log_every", "ckpt_every", "keep_last", "num_workers", "precision")
PAIRS_NAME = "reflow_pairs.safetensors"


# -- the teacher -----------------------------------------------------------------------------
@dataclass
class Teacher:
    """A frozen flow-matching DiT with its objective, its default sampling and its training data."""

    model: DiT
    objective: FlowMatching
    sampling: Sampling
    data: str | None
    path: Path


def recorded_data(path: Path) -> str | None:
    """The data a ditkit checkpoint was trained on: config.json's "data", a training checkpoint's args."""
    if path.is_dir() or path.suffix == ".safetensors":
        config = (path if path.is_dir() else path.parent) / "config.json"
        return json.loads(config.read_text()).get("data") if config.exists() else None
    args = read_pt(path).get("args")
    return args.get("data_path") if isinstance(args, dict) else None


def load_teacher(name: str, device: torch.device) -> Teacher:
    """The teacher `--teacher` names, or one sentence on why it cannot be distilled."""
    path = find_checkpoint(name)
    ck = read_checkpoint(path)
    config = ck.config or infer_config(ck.state)
    if not isinstance(config, DiTConfig):
        raise ValueError(f"{path} is not a class-conditional DiT (it is a text-to-image MMDiT, or no DiT at all); ditkit distill takes class-conditional DiT teachers.")
    kind = ck.meta.get("objective", {}).get("objective", "gaussian")  # what records none samples as the paper's diffusion
    if kind != "flow":
        raise ValueError(f"{path} is a {kind} diffusion model, and ditkit distill needs a flow-matching teacher; distil a model trained with ditkit train --objective flow.")
    model = load_model(ck).to(device).requires_grad_(False).eval()
    objective = build_objective(ObjectiveConfig(**ck.meta["objective"]), learn_sigma=model.config.learn_sigma)
    sampling = resolve_sampling(SamplingOptions(), "flow", ck.meta.get("sampling", {}), ck.official)
    return Teacher(model, objective, sampling, recorded_data(path), path)


def guided_velocity(model, flow: FlowMatching, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w,
                    interval: tuple[float, float] | None = None) -> torch.Tensor:  # fmt: skip
    """The guided velocity v_null + w (v_cond - v_null) of `model` at per-sample times t (flow time,
    0 = noise); w is a number or (N,), 1 where t lies outside `interval`. Unlike samplers.cfg_model,
    every sample has its own t. A cfg_embed model takes w as its input, in one pass."""
    if isinstance(w, (int, float)) and w == 1.0:
        return flow.velocity(model, x, t, y=y)
    if interval is not None:
        inside = (t >= interval[0]) & (t <= interval[1])
        w = torch.where(inside, torch.as_tensor(w, dtype=t.dtype, device=t.device), 1.0)  # (N,)
    if model.config.cfg_embed:
        return flow.velocity(model, x, t, y=y, cfg_scale=torch.as_tensor(w, device=t.device).expand(len(x)))
    null = torch.full_like(y, model.config.null_class)
    v = flow.velocity(model, torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))  # (2N, C, H, W)
    cond, uncond = v.chunk(2)
    w = torch.as_tensor(w, dtype=v.dtype, device=v.device)
    return uncond + (expand_to(w, v) if w.ndim else w) * (cond - uncond)


def ode_step(v, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, solver: str) -> torch.Tensor:
    """One step of dx/dt = v(x, t) from per-sample times t0 to t1 as the fixed-grid sampler
    `solver` takes it: euler; heun2 (Heun everywhere); heun (Euler on a step that ends at t = 1)."""
    dt = expand_to(t1 - t0, x)
    k1 = v(x, t0)
    if solver == "euler":
        return x + dt * k1
    heun = x + dt * 0.5 * (k1 + v(x + dt * k1, t1))
    return torch.where(expand_to(t1 >= 1, x), x + dt * k1, heun) if solver == "heun" else heun


# -- the distillation task ---------------------------------------------------------------------
class Distillation:
    """The Trainer's task (see ditkit.train.tasks) for a student of `teacher`: the student starts as
    the teacher, trains on the teacher's data, and learns from the method's loss."""

    def __init__(self, cfg: DistillConfig, teacher: Teacher):
        self.dcfg, self.teacher = cfg, teacher
        c = teacher.model.config
        scale = teacher.sampling.cfg_scale if cfg.cfg_scale is None else cfg.cfg_scale
        interval = tuple(cfg.cfg_interval) if cfg.cfg_interval else teacher.sampling.cfg_interval
        self.scale, self.interval = scale, interval  # the guidance the teacher's targets are made with
        self.time_shift = teacher.sampling.time_shift if teacher.sampling.time_shift is not None else teacher.objective.time_shift
        if cfg.method == "guidance":
            if c.cfg_embed:
                raise ValueError(f"{teacher.path} already takes the guidance scale as an input; distil its teacher, or use --method progressive or reflow.")
            lo, hi = cfg.cfg_range
            if not lo <= scale <= hi:
                raise ValueError(f"the guidance scale {scale:g} the student is to record lies outside --cfg-range {lo:g} {hi:g}; widen the range or pass --cfg-scale within it.")
            self.student_config = replace(c, cfg_embed=True, cfg_range=(lo, hi))
        else:
            self.student_config = c
        self.data = ClassTask()  # the teacher's data, read as ditkit train reads it
        self.phase, self.phase_teacher = 0, None  # progressive: the phase the step is in, and its teacher (after phase 0)
        self.pairs = None  # reflow: (noise, data, labels), made in prepare()

    def train_config(self, resume_from: Path | None) -> TrainConfig:
        """ditkit train's settings for the student: the teacher's network, objective and data, this
        command's optimisation and run."""
        cfg, t, c = self.dcfg, self.teacher, self.teacher.model.config
        data = cfg.data_path or t.data
        if not data:
            raise ValueError(f"{t.path} does not record the data it was trained on; pass --data-path with it.")
        pixel = c.in_channels in (1, 3)
        p = c.patch_size
        return TrainConfig(
            data_path=data, results_dir=cfg.results_dir, model=f"DiT-S/{p if p in (2, 4, 8) else 2}", depth=c.depth,
            hidden_size=c.hidden_size, num_heads=c.num_heads, patch_size=p, learn_sigma=c.learn_sigma, class_dropout_prob=0.0,
            mlp=c.mlp, norm=c.norm, qk_norm=c.qk_norm, pos_embed=c.pos_embed, block=c.block, **t.objective.config.to_dict(),
            image_size=c.input_size if pixel else None, channels=c.in_channels if pixel else None, num_classes=c.num_classes,
            max_steps=cfg.max_steps, max_minutes=cfg.max_minutes, global_batch_size=cfg.global_batch_size, global_seed=cfg.global_seed,
            lr=cfg.lr, ema_decay=cfg.ema_decay, ema_schedule=cfg.ema_schedule, num_workers=cfg.num_workers, log_every=cfg.log_every,
            ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last, precision=cfg.precision, device=cfg.device,
            resume=str(resume_from) if resume_from else None,
        )  # fmt: skip

    # -- what the trainer asks of a task ---------------------------------------------------
    def build(self, config) -> DiT:
        """The student with the teacher's weights; a new guidance embedding starts at zero (as the teacher)."""
        model = DiT(config)
        missing, unexpected = model.load_state_dict(self.teacher.model.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("w_embedder.") for k in missing), (missing, unexpected)
        return model

    def run_name(self, cfg: TrainConfig, base) -> str:
        return f"distill-{self.dcfg.method}"

    def dataset(self, cfg: TrainConfig, channels: int | None, d):
        return self.data.dataset(cfg, channels, d)

    def model_config(self, cfg: TrainConfig, num_classes: int, input_size: int, in_channels: int, base):
        c = self.student_config
        if (in_channels, input_size) != (c.in_channels, c.input_size) or num_classes > c.num_classes:
            raise ValueError(f"{cfg.data_path} holds {in_channels}-channel {input_size}x{input_size} items of {num_classes} classes, but the teacher "
                             f"takes {c.in_channels}-channel {c.input_size}x{c.input_size} ones of {c.num_classes}; pass --data-path with the data it was trained on"
                             f"{' (its latent store, from ditkit extract)' if c.in_channels not in (1, 3) else ''}.")  # fmt: skip
        return c

    def condition(self, y, drop, config):
        return self.data.condition(y, drop, config)

    def grid_condition(self, dataset, config, device):
        return self.data.grid_condition(dataset, config, device)

    def recorded(self, cfg: TrainConfig) -> dict:
        """The student's default sampling (over the trainer's): the teacher's guided one for a guidance
        student (half the evaluations), else Euler at --student-steps with the guidance baked in."""
        d = self.dcfg
        if d.method == "guidance":
            sampling = replace(self.teacher.sampling, cfg_scale=self.scale, cfg_interval=self.interval, cfg_channels=None)
        else:
            sampling = Sampling(sampler="euler", steps=self.phase_steps(self.phase) if d.method == "progressive" else d.student_steps,
                                cfg_scale=1.0, time_shift=self.time_shift)  # fmt: skip
        distilled = {"method": d.method, "teacher": str(self.teacher.path), "teacher_cfg_scale": self.scale,
                     "teacher_cfg_interval": list(self.interval) if self.interval else None}  # fmt: skip
        return {"sampling": sampling.to_dict(), "distilled": distilled}

    def state(self, trainer) -> dict:
        teacher = self.phase_teacher.state_dict() if self.phase_teacher is not None else None
        return {"distill": asdict(self.dcfg), "phase": self.phase, "phase_teacher": teacher}

    def load_state(self, trainer, ck: dict) -> None:
        self.phase = ck.get("phase", 0)
        if ck.get("phase_teacher") is not None:
            self.phase_teacher = frozen_copy(trainer.ema, ck["phase_teacher"])

    def prepare(self, trainer) -> None:
        self.teacher.model.to(trainer.d.device)
        if self.dcfg.method == "reflow":
            self.pairs = self.make_pairs(trainer)

    def loss(self, trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg, d = trainer.cfg, trainer.d
        g = torch.Generator(device=d.device).manual_seed((cfg.global_seed * 1_000_003 + trainer.step) % 2**63)
        mine = slice(d.rank, None, d.world)  # as the trainer: rank r holds global positions r, r + world, ...
        n, shape = cfg.global_batch_size, tuple(x.shape[1:])
        if self.dcfg.method == "progressive" and self.phase_of(trainer.step) != self.phase:
            # A new phase: its teacher is the last phase's student (EMA), which the student starts from.
            self.phase = self.phase_of(trainer.step)
            self.phase_teacher = frozen_copy(trainer.ema, trainer.ema.state_dict())
        return getattr(self, f"loss_{self.dcfg.method}")(trainer, x, y, g, n, shape, mine)

    def after_step(self, trainer) -> None:
        if self.dcfg.method == "progressive" and trainer.step + 1 == self.phase_end(self.phase) and trainer.d.main:
            self.save_phase(trainer)

    # -- progressive phases ----------------------------------------------------------------
    def phase_of(self, step: int) -> int:
        return min(step // (self.dcfg.max_steps // self.dcfg.phases), self.dcfg.phases - 1)

    def phase_steps(self, phase: int) -> int:
        """The student's Euler steps in a phase: start_steps, halved each phase."""
        return self.dcfg.start_steps >> phase

    def phase_end(self, phase: int) -> int:
        return self.dcfg.max_steps if phase == self.dcfg.phases - 1 else (phase + 1) * (self.dcfg.max_steps // self.dcfg.phases)

    # -- the losses --------------------------------------------------------------------------
    def loss_guidance(self, trainer, x, y, g, n, shape, mine) -> torch.Tensor:
        t = trainer.objective.draw_t(n, generator=g, device=x.device)[mine]
        noise = torch.randn((n, *shape), generator=g, device=x.device)[mine]
        lo, hi = self.dcfg.cfg_range
        w = (lo + (hi - lo) * torch.rand(n, generator=g, device=x.device))[mine]
        xt, _ = trainer.objective.interpolate(x, noise, t)
        with torch.no_grad():
            target = guided_velocity(self.teacher.model, trainer.objective, xt, t, y, w).float()
        return mean_flat((student_velocity(trainer, xt, t, y, cfg_scale=w) - target) ** 2).mean()

    def loss_progressive(self, trainer, x, y, g, n, shape, mine) -> torch.Tensor:
        steps = self.phase_steps(self.phase)
        ts = trainer.objective.time_grid(2 * steps, shift=self.time_shift, device=x.device)  # the teacher's half steps
        i = torch.randint(steps, (n,), generator=g, device=x.device)[mine]
        noise = torch.randn((n, *shape), generator=g, device=x.device)[mine]
        t0, tm, t1 = ts[2 * i], ts[2 * i + 1], ts[2 * i + 2]
        xt, _ = trainer.objective.interpolate(x, noise, t0)
        with torch.no_grad():
            if self.phase == 0:  # the guided teacher, with its own solver
                solver = self.teacher.sampling.sampler if self.teacher.sampling.sampler in ("euler", "heun") else "heun2"
                v = lambda z, s: guided_velocity(self.teacher.model, trainer.objective, z, s, y, self.scale, self.interval)  # noqa: E731
            else:
                solver = "euler"
                v = lambda z, s: trainer.objective.velocity(self.phase_teacher, z, s, y=y)  # noqa: E731
            x1 = ode_step(v, ode_step(v, xt, t0, tm, solver), tm, t1, solver)
            target = ((x1 - xt) / expand_to(t1 - t0, xt)).float()  # the velocity of one Euler step that lands on x1
        return mean_flat((student_velocity(trainer, xt, t0, y) - target) ** 2).mean()

    def loss_reflow(self, trainer, x, y, g, n, shape, mine) -> torch.Tensor:
        noise, data, labels = self.pairs
        idx = torch.randint(len(data), (n,), generator=g, device=x.device)[mine]
        t = trainer.objective.draw_t(n, generator=g, device=x.device)
        if trainer.step >= round((1 - self.dcfg.one_step_share) * self.dcfg.max_steps):
            t[: n // 2] = 0.0  # the 1-step map: one Euler step from noise is the whole line
        t = t[mine]
        z, x1, y = noise[idx], data[idx], labels[idx]
        xt, ut = trainer.objective.interpolate(x1, z, t)
        return mean_flat((student_velocity(trainer, xt, t, y) - ut) ** 2).mean()

    def save_phase(self, trainer) -> None:
        """RUN/model-Nstep: the EMA student at the end of a progressive phase, sampled by Euler at N steps."""
        steps = self.phase_steps(self.phase)
        sampling = Sampling(sampler="euler", steps=steps, cfg_scale=1.0, time_shift=self.time_shift).to_dict()
        save_pretrained(trainer.ema, trainer.ema.config, trainer.exp_dir / f"model-{steps}step",
                        extra={"step": trainer.step + 1, "data": trainer.cfg.data_path, **trainer.recorded(), "sampling": sampling})  # fmt: skip

    # -- reflow pairs ------------------------------------------------------------------------
    @torch.no_grad()
    def make_pairs(self, trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, teacher sample, label) x reflow_pairs from the guided teacher at its default sampler,
        written to RUN/reflow_pairs.safetensors after every batch: an interrupted run picks up there."""
        path = trainer.exp_dir / PAIRS_NAME
        total, c, s = self.dcfg.reflow_pairs, self.teacher.model.config, self.teacher.sampling
        done = load_file(str(path)) if path.exists() else {"noise": torch.zeros(0), "data": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
        if trainer.d.main and len(done["data"]) < total:
            labels = torch.arange(total) % c.num_classes
            batch = trainer.cfg.global_batch_size
            bar = tqdm(total=total, initial=len(done["data"]), desc="reflow pairs", dynamic_ncols=True)
            while len(done["data"]) < total:
                start = len(done["data"])
                y = labels[start : start + batch]
                g = torch.Generator().manual_seed(trainer.cfg.global_seed * 1_000_003 + start)  # batch by batch: the same pairs after a resume
                z = torch.randn(len(y), c.in_channels, c.input_size, c.input_size, generator=g)
                x1 = sample(self.teacher.model, self.teacher.objective, z.to(trainer.d.device), y.to(trainer.d.device), sampler=s.sampler, steps=s.steps,
                            cfg_scale=self.scale, cfg_interval=self.interval, clip_denoised=c.in_channels in (1, 3),
                            time_shift=self.time_shift).cpu()  # fmt: skip
                done = {"noise": torch.cat([done["noise"].view(-1, *z.shape[1:]), z]), "data": torch.cat([done["data"].view(-1, *z.shape[1:]), x1]),
                        "labels": torch.cat([done["labels"], y])}  # fmt: skip
                atomic_write(path, lambda tmp: safetensors_save({k: v.contiguous() for k, v in done.items()}, tmp))
                bar.update(len(y))
            bar.close()
        barrier(trainer.d)
        done = load_file(str(path))
        return tuple(done[k][:total].to(trainer.d.device) for k in ("noise", "data", "labels"))  # type: ignore[return-value]


def student_velocity(trainer, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
    """The student's velocity at flow time t, in float32."""
    return trainer.objective.velocity(lambda *a, **k: trainer.net(*a, **k).float(), x, t, y=y, **kwargs)


def frozen_copy(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """A frozen copy of `model` holding `state`: a progressive phase's teacher."""
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(state)
    return copy_.requires_grad_(False).eval()


class Distiller:
    """A distillation run: ditkit train's Trainer with the Distillation task. Its step, data, loop
    and state are the trainer's; the task holds what is the method's (the phase, the reflow pairs)."""

    def __init__(self, cfg: DistillConfig):
        resume_from = None
        if cfg.resume:  # the run's own distillation settings, then the trainer resumes the same file
            resume_from = resume_checkpoint(cfg.resume, Path(cfg.results_dir))
            saved = read_pt(resume_from).get("distill")
            if not isinstance(saved, dict):
                raise ValueError(f"{resume_from} is not a checkpoint of ditkit distill; resume it with ditkit train, or pass a distillation run.")
            cfg = resume_config(cfg, saved, resume_from, RESUME_FREE)
        resolve_device(cfg.device)  # a bad --device fails before the teacher loads
        self.task = Distillation(cfg, load_teacher(cfg.teacher, torch.device("cpu")))  # onto this process's device in prepare()
        self.trainer = Trainer(self.task.train_config(resume_from), self.task)

    @property
    def step(self) -> int:
        return self.trainer.step

    @step.setter
    def step(self, value: int) -> None:
        self.trainer.step = value

    @property
    def exp_dir(self) -> Path:
        return self.trainer.exp_dir

    @property
    def phase(self) -> int:
        return self.task.phase

    @property
    def pairs(self):
        return self.task.pairs

    @pairs.setter
    def pairs(self, value) -> None:
        self.task.pairs = value

    def make_pairs(self):
        return self.task.make_pairs(self.trainer)

    def loader(self):
        return self.trainer.loader()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.trainer.train_step(x, y)

    def run(self) -> Path:
        return self.trainer.run()


def run_distill(cfg: DistillConfig) -> Path:
    return Distiller(cfg).run()
