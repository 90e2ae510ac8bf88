"""What a run trains, apart from how: the network, its data and its condition. The Trainer asks its
task for

    run_name(cfg, base) -> str                      MODEL in RESULTS_DIR/NNN-MODEL
    dataset(cfg, channels, d) -> DitDataset         the training data
    model_config(cfg, num_classes, input_size, in_channels, base) -> config
    build(config) -> nn.Module                      a fresh network (the trainer loads --init-from weights)
    condition(y, drop, config)                      what the network is conditioned on, `drop` rows made null
    grid_condition(dataset, config, device)         (the sample grid's condition, its columns)
    recorded(cfg) -> dict                           what a model records beside objective and sampling

and, where a task changes the step itself (distillation), loss(trainer, x, y), after_step(trainer),
prepare(trainer), state() and load_state(ck); where its samples are not images, save_grid(samples,
path, ncol) (a video task's animated grid). `ClassTask` is the paper's class-conditional DiT;
the text-to-image task is ditkit.text.task.TextTask, the video one ditkit.video.task.VideoTask, the
distillations ditkit.distill's.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import DiTConfig, TrainConfig, UViTConfig
from ..data import build_dataset
from ..models import DiT, UViT
from .resume import base_model_config


def build_class_model(config: DiTConfig | UViTConfig) -> nn.Module:
    """The class-conditional network a config describes: a U-ViT or a DiT."""
    return UViT(config) if isinstance(config, UViTConfig) else DiT(config)


class ClassTask:
    """A class-conditional network on labelled images: a DiT or U-ViT by default; `model_factory`
    builds any module with forward(x, t, y) -> (N, C or 2C, H, W) whose `.config` has DiTConfig's data
    fields (input_size, in_channels, num_real_classes, null_class, learn_sigma), such as the study's U-Net;
    `name` names its run folders where the --model preset would not say what is built (NNN-NAME)."""

    def __init__(self, model_factory: Callable[[DiTConfig], nn.Module] = build_class_model, name: str | None = None):
        self.build = model_factory
        self.name = name

    def run_name(self, cfg: TrainConfig, base) -> str:
        if base is not None:
            return "lora" if cfg.lora_rank else "finetune"
        return (self.name or cfg.model).replace("/", "-").replace(" ", "")

    def dataset(self, cfg: TrainConfig, channels: int | None, d):
        return build_dataset(cfg.data_path, cfg.image_size, channels, flip=cfg.flip, on_bad_image=cfg.on_bad_image, seed=cfg.global_seed)

    def model_config(self, cfg: TrainConfig, num_classes: int, input_size: int, in_channels: int, base) -> DiTConfig:
        if base is not None:
            return base_model_config(base, cfg, num_classes, input_size, in_channels)
        return cfg.model_config(num_classes, input_size, in_channels)

    def condition(self, y: torch.Tensor, drop: torch.Tensor, config) -> torch.Tensor:
        if config.null_class is None:  # a network without a null class drops no labels
            return y
        return torch.where(drop, config.null_class, y)

    def grid_condition(self, dataset, config, device) -> tuple[torch.Tensor, int]:
        """Every class up to 10, twice."""
        classes = min(config.num_real_classes, 10)
        return torch.arange(classes, device=device).repeat(2), classes

    def recorded(self, cfg: TrainConfig) -> dict:
        return {}
