"""A `ditkit distill` run: ditkit train's Trainer with the Distillation task, and --resume."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DistillConfig
from ..train import Trainer
from ..train.resume import resume_config
from ..utils.devices import resolve_device
from ..utils.io import read_pt
from ..utils.runs import resume_checkpoint
from .task import Distillation
from .teacher import load_teacher

# Settings a resumed distillation may change, as ditkit train's may; the others shape the numbers
# (a progressive run's --max-steps too: its phases are spread over the steps).
RESUME_FREE = ("max_steps", "max_minutes", "log_every", "ckpt_every", "keep_last", "num_workers", "precision")


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
            if cfg.method == "progressive" and cfg.max_steps != saved.get("max_steps"):
                raise ValueError(f"{resume_from} is a progressive distillation, whose phases are spread over its --max-steps {saved.get('max_steps')}; "
                                 f"drop --max-steps {cfg.max_steps} to continue it, or distil again with more steps.")  # fmt: skip
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
