"""`ditkit train`: the paper's recipe from one CPU to many GPU nodes (torchrun), resumable.

The Trainer (trainer.py) is assembled from parts that each work alone: builders.py (VAE, data
shape, networks, optimizer, loader, run folder), resume.py (--resume and --init-from),
schedule.py (step randomness, learning rate, EMA, data order), log.py (progress and log.csv),
and a task (tasks.py) that says what trains: a class-conditional DiT, an MMDiT
(ditkit.text.task), a U-Net (ditkit study), a distilled student (ditkit distill).
"""

from .tasks import ClassTask
from .trainer import Trainer, run_train

__all__ = ["ClassTask", "Trainer", "run_train"]
