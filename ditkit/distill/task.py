"""The Distillation task: what ditkit train's Trainer runs for `ditkit distill` (the student, its
data and the method's loss), and the methods that need no second network: guidance, progressive
and reflow. ADD and LADD add a discriminator (adversarial.py)."""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..checkpoints import infer_config, read_checkpoint, save_pretrained
from ..config import DiTConfig, DistillConfig, Sampling, TrainConfig
from ..models import DiT
from ..objectives.common import expand_to, mean_flat
from ..parallel import barrier
from ..samplers import sample
from ..train import ClassTask
from ..utils.io import atomic_write, safetensors_save
from ..utils.runs import find_checkpoint
from .adversarial import Adversarial
from .teacher import Teacher, guided_velocity, ode_step

PAIRS_NAME = "reflow_pairs.safetensors"


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
        self.init_state = student_init(cfg.student_init, c) if cfg.student_init else None
        self.phase, self.phase_teacher = 0, None  # progressive: the phase the step is in, and its teacher (after phase 0)
        self.pairs = None  # reflow: (noise, data, labels), made in prepare()
        self.adversarial = Adversarial(cfg, teacher, scale, interval, self.time_shift) if cfg.method in ("add", "ladd") else None

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
            mlp=c.mlp, norm=c.norm, qk_norm=c.qk_norm, pos_embed=c.pos_embed, mlp_conv=c.mlp_conv, block=c.block, **t.objective.config.to_dict(),
            image_size=c.input_size if pixel else None, channels=c.in_channels if pixel else None, num_classes=c.num_classes,
            max_steps=cfg.max_steps, max_minutes=cfg.max_minutes, global_batch_size=cfg.global_batch_size, global_seed=cfg.global_seed,
            lr=cfg.lr, ema_decay=cfg.ema_decay, ema_schedule=cfg.ema_schedule, num_workers=cfg.num_workers, log_every=cfg.log_every,
            ckpt_every=cfg.ckpt_every, keep_last=cfg.keep_last, precision=cfg.precision, device=cfg.device,
            resume=str(resume_from) if resume_from else None,
        )  # fmt: skip

    # -- what the trainer asks of a task ---------------------------------------------------
    @property
    def further(self) -> str:
        """How to take a finished run further (the trainer's closing words)."""
        if self.dcfg.method == "progressive":
            return "distil again with a larger --max-steps to go further (a progressive run spreads its phases over its steps)"
        return "pass a larger --max-steps to train it further"

    def build(self, config) -> DiT:
        """The student with the teacher's weights (or --student-init's); a new guidance embedding starts
        at zero (as the teacher)."""
        model = DiT(config)
        missing, unexpected = model.load_state_dict(self.init_state or self.teacher.model.state_dict(), strict=False)
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
        if d.method == "add":
            distilled["disc_net"] = d.disc_net
        if d.student_init:
            distilled["student_init"] = d.student_init
        return {"sampling": sampling.to_dict(), "distilled": distilled}

    def state(self, trainer) -> dict:
        teacher = self.phase_teacher.state_dict() if self.phase_teacher is not None else None
        adversarial = self.adversarial.state() if self.adversarial else {}
        return {"distill": asdict(self.dcfg), "phase": self.phase, "phase_teacher": teacher, **adversarial}

    def load_state(self, trainer, ck: dict) -> None:
        self.phase = ck.get("phase", 0)
        if ck.get("phase_teacher") is not None:
            self.phase_teacher = frozen_copy(trainer.ema, ck["phase_teacher"])
        if self.adversarial:
            self.adversarial.load_state(trainer, ck)

    def prepare(self, trainer) -> None:
        self.teacher.model.to(trainer.d.device)
        if self.dcfg.method == "reflow":
            self.pairs = self.make_pairs(trainer)
        if self.adversarial:
            self.adversarial.build(trainer)

    def loss(self, trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg, d = trainer.cfg, trainer.d
        g = torch.Generator(device=d.device).manual_seed((cfg.global_seed * 1_000_003 + trainer.step) % 2**63)
        mine = slice(d.rank, None, d.world)  # as the trainer: rank r holds global positions r, r + world, ...
        n, shape = cfg.global_batch_size, tuple(x.shape[1:])
        if self.dcfg.method == "progressive" and self.phase_of(trainer.step) != self.phase:
            # A new phase: its teacher is the last phase's student (EMA), which the student starts from.
            self.phase = self.phase_of(trainer.step)
            self.phase_teacher = frozen_copy(trainer.ema, trainer.ema.state_dict())
        if self.adversarial:
            return self.adversarial.loss(trainer, x, y, g, n, shape, mine)
        return getattr(self, f"loss_{self.dcfg.method}")(trainer, x, y, g, n, shape, mine)

    def after_step(self, trainer) -> None:
        if self.adversarial:
            self.adversarial.after_step(trainer)
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


def student_init(name: str, teacher: DiTConfig) -> dict:
    """--student-init's weights: a model of the teacher's architecture (a student of it), or one sentence."""
    ck = read_checkpoint(find_checkpoint(name))
    c = ck.config or infer_config(ck.state)
    if not isinstance(c, DiTConfig):
        raise ValueError(f"--student-init {ck.path} is not a class-conditional DiT; pass a student of this teacher, such as an earlier distillation's model/.")
    ours, theirs = asdict(teacher), asdict(replace(c, class_dropout_prob=teacher.class_dropout_prob))
    if ours != theirs:
        changed = "; ".join(f"{k} {theirs[k]}, the teacher's {v}" for k, v in ours.items() if theirs[k] != v)
        raise ValueError(f"--student-init {ck.path} is not a DiT of the teacher's architecture ({changed}); pass a student of this teacher, such as an earlier distillation's model/.")
    return ck.state


def student_velocity(trainer, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
    """The student's velocity at flow time t, in float32."""
    return trainer.objective.velocity(lambda *a, **k: trainer.net(*a, **k).float(), x, t, y=y, **kwargs)


def frozen_copy(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """A frozen copy of `model` holding `state`: a progressive phase's teacher."""
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(state)
    return copy_.requires_grad_(False).eval()
