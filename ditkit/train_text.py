"""Text-to-image training (`ditkit train --model MMDiT-S/2 ...`): the Trainer with captions for labels.

A captioned dataset yields caption ids. The distinct captions are encoded once (and cached, see
`text.caption_table`) and looked up on the device every step, so the text encoder never runs in
the training loop. Prompt dropout replaces a caption by the empty prompt (row 0 of the table),
drawn per global batch exactly as label dropout is, so runs resume bitwise as class runs do.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from .captions import build_captioned_dataset
from .config import MMDiTConfig, TrainConfig
from .models.mmdit import MMDiT, TextCondition
from .text import TextEncoder, caption_table
from .train import Trainer


def encoder_record(name: str, max_length: int) -> dict:
    """What a model records of its text encoder: a folder as an absolute path, else the name."""
    path = Path(name).expanduser()
    return {"name": str(path.resolve()) if path.exists() else name, "max_length": max_length}


class TextTrainer(Trainer):
    def __init__(self, cfg: TrainConfig):
        self.encoder: TextEncoder | None = None  # loaded on the first sample grid
        super().__init__(cfg, model_factory=MMDiT)

    def make_dataset(self, channels: int | None):
        cfg = self.cfg
        dataset = build_captioned_dataset(cfg.data_path, cfg.image_size, channels, flip=cfg.flip, on_bad_image=cfg.on_bad_image, seed=cfg.global_seed)
        encode = lambda: caption_table(dataset.captions, cfg.text_encoder, cfg.text_max_length, device=self.d.device)  # noqa: E731
        if self.d.world > 1:  # rank 0 encodes into the cache, the others read it
            if self.d.main:
                encode()
            dist.barrier()
        self.table = encode().to(self.d.device)
        return dataset

    def make_model_config(self, num_classes: int, input_size: int, in_channels: int) -> MMDiTConfig:
        cfg = self.cfg
        overrides = {f: getattr(cfg, f) for f in ("depth", "hidden_size", "num_heads", "patch_size")}
        return MMDiTConfig.from_preset(
            cfg.model, **overrides, input_size=input_size, in_channels=in_channels, context_dim=self.table.tokens.shape[-1],
            pooled_dim=self.table.pooled.shape[-1], prompt_dropout_prob=cfg.class_dropout_prob,
        )  # fmt: skip

    def condition(self, y: torch.Tensor, drop: torch.Tensor) -> TextCondition:
        return self.table.condition(torch.where(drop, 0, y))  # caption 0 is the empty prompt

    def recorded(self) -> dict:
        return {**super().recorded(), "text_encoder": encoder_record(self.cfg.text_encoder, self.cfg.text_max_length)}

    def grid_condition(self) -> tuple[TextCondition, int]:
        """The dataset's demo prompts (or its first captions), twice."""
        prompts = list(getattr(self.dataset, "demo_prompts", self.dataset.captions[1:11]))
        if self.encoder is None:
            self.encoder = TextEncoder(self.cfg.text_encoder, self.d.device, self.cfg.text_max_length)
        return self.encoder.encode(prompts * 2), len(prompts)
