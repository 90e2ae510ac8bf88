"""Video training (`ditkit train --model VDiT-S/4x2 ...`): the trainer's task for a video DiT on
clips (see ditkit.train.tasks for what a task answers), and for a text-to-video MMDiT on captioned
clips (`--model MMDiT-S/4x2 --data-path moving-fashion-mnist-captions`). The objectives, the step
and the samplers are the image ones: a sample is a (C, T, H, W) tensor instead of a (C, H, W) one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig, VideoDiTConfig, VideoMMDiTConfig
from ..models.mmdit import VideoMMDiT
from ..models.video import VideoDiT
from ..text.task import TextTask
from .build import build_captioned_video_dataset, build_video_dataset
from .io import save_clip_grid


class VideoTask:
    """A class-conditional video DiT on labelled clips; its sample grids are animated GIFs."""

    build = VideoDiT

    def __init__(self):
        self.frames: int | None = None  # the data's, known once the dataset is built

    def run_name(self, cfg: TrainConfig, base) -> str:
        return cfg.model.replace("/", "-")

    def dataset(self, cfg: TrainConfig, channels: int | None, d):
        dataset = build_video_dataset(cfg.data_path, cfg.frames, cfg.image_size, channels, flip=cfg.flip,
                                      on_bad_image=cfg.on_bad_image, seed=cfg.global_seed)  # fmt: skip
        self.frames = dataset.frames
        return dataset

    def model_config(self, cfg: TrainConfig, num_classes: int, input_size: int, in_channels: int, base) -> VideoDiTConfig:
        return cfg.video_model_config(num_classes, input_size, in_channels, self.frames)

    def condition(self, y: torch.Tensor, drop: torch.Tensor, config) -> torch.Tensor:
        return torch.where(drop, config.null_class, y)

    def grid_condition(self, dataset, config, device) -> tuple[torch.Tensor, int]:
        """Every class up to 10, once."""
        classes = min(config.num_classes, 10)
        return torch.arange(classes, device=device), classes

    def recorded(self, cfg: TrainConfig) -> dict:
        return {}

    def save_grid(self, clips: np.ndarray, path: Path, ncol: int) -> Path:
        """(N, T, H, W, C) uint8 -> PATH.gif, an animated grid."""
        return save_clip_grid(clips, Path(path).with_suffix(".gif"), ncol, mp4=False)[0]


class TextVideoTask(TextTask):
    """A text-to-video MMDiT on captioned clips: the text-to-image task's captions and condition
    (caption ids, the encoded table, prompt dropout), clips and animated grids for images."""

    build = VideoMMDiT
    save_grid = VideoTask.save_grid

    def dataset(self, cfg: TrainConfig, channels: int | None, d):
        dataset = build_captioned_video_dataset(cfg.data_path, cfg.frames, cfg.image_size, channels, flip=cfg.flip, seed=cfg.global_seed)
        self.frames = dataset.frames
        self.encode_captions(dataset, cfg, d)
        return dataset

    def model_config(self, cfg: TrainConfig, num_classes: int, input_size: int, in_channels: int, base) -> VideoMMDiTConfig:
        return VideoMMDiTConfig.from_preset(
            cfg.model, **cfg.net.sizes(), input_size=input_size, in_channels=in_channels, frames=self.frames, context_dim=self.table.tokens.shape[-1],
            pooled_dim=self.table.pooled.shape[-1], prompt_dropout_prob=cfg.class_dropout_prob,
        )  # fmt: skip
