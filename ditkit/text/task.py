"""Text-to-image training (`ditkit train --model MMDiT-S/2 ...`): the trainer's task for an MMDiT,
with captions for labels (see ditkit.train.tasks for what a task answers).

A captioned dataset yields caption ids. The distinct captions are encoded once (and cached, see
`text.caption_table`) and looked up on the device every step, so the text encoder never runs in
the training loop. Prompt dropout replaces a caption by the empty prompt (row 0 of the table),
drawn per global batch exactly as label dropout is, so runs resume bitwise as class runs do.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..config import MMDiTConfig, TrainConfig
from ..models.mmdit import MMDiT, TextCondition
from .captions import build_captioned_dataset
from .encoder import CaptionTable, TextEncoder, caption_table


def encoder_record(name: str, max_length: int) -> dict:
    """What a model records of its text encoder: a folder as an absolute path, else the name."""
    path = Path(name).expanduser()
    return {"name": str(path.resolve()) if path.exists() else name, "max_length": max_length}


def base_text_config(base, cfg: TrainConfig, input_size: int, in_channels: int, widths: tuple[int, int]) -> MMDiTConfig:
    """The --init-from MMDiT's config, after checking that these captions and images fit it."""
    c = base.config
    if not isinstance(c, MMDiTConfig):
        raise ValueError(f"--init-from {base.path} is not a text-to-image MMDiT; pass an MMDiT's model folder, run folder or checkpoint.")
    if (in_channels, input_size) != (c.in_channels, c.input_size):
        raise ValueError(f"{cfg.data_path} gives {in_channels}-channel inputs of {input_size}x{input_size}, but --init-from {base.path} "
                         f"takes {c.in_channels}-channel {c.input_size}x{c.input_size}; pass --image-size and --channels to match it.")  # fmt: skip
    recorded = base.meta.get("text_encoder", {}).get("name")
    if recorded != encoder_record(cfg.text_encoder, cfg.text_max_length)["name"] or widths != (c.context_dim, c.pooled_dim):
        raise ValueError(f"--init-from {base.path} reads prompts with {recorded}, not {cfg.text_encoder}; pass --text-encoder {recorded}.")
    return c


class TextTask:
    """An MMDiT on captioned images: caption ids for labels, the caption table for the condition."""

    build = MMDiT

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg  # the text encoder and its length
        self.table: CaptionTable | None = None  # the dataset's captions, encoded once
        self.encoder: TextEncoder | None = None  # loaded on the first sample grid

    def run_name(self, cfg: TrainConfig, base) -> str:
        return cfg.model.replace("/", "-")

    def dataset(self, cfg: TrainConfig, channels: int | None, d):
        dataset = build_captioned_dataset(cfg.data_path, cfg.image_size, channels, flip=cfg.flip, on_bad_image=cfg.on_bad_image, seed=cfg.global_seed)
        self.encode_captions(dataset, cfg, d)
        return dataset

    def encode_captions(self, dataset, cfg: TrainConfig, d) -> None:
        """The table of the dataset's captions, on the device."""
        encode = lambda: caption_table(dataset.captions, cfg.text_encoder, cfg.text_max_length, device=d.device)  # noqa: E731
        if d.world > 1:  # rank 0 encodes into the cache, the others read it
            if d.main:
                encode()
            dist.barrier()
        self.table = encode().to(d.device)

    def model_config(self, cfg: TrainConfig, num_classes: int, input_size: int, in_channels: int, base) -> MMDiTConfig:
        widths = self.table.tokens.shape[-1], self.table.pooled.shape[-1]
        if base is not None:  # --init-from: continue the base MMDiT on these captions
            return base_text_config(base, cfg, input_size, in_channels, widths)
        return MMDiTConfig.from_preset(
            cfg.model, **cfg.net.sizes(), input_size=input_size, in_channels=in_channels, context_dim=widths[0],
            pooled_dim=widths[1], prompt_dropout_prob=cfg.class_dropout_prob,
        )  # fmt: skip

    def condition(self, y: torch.Tensor, drop: torch.Tensor, config) -> TextCondition:
        return self.table.condition(torch.where(drop, 0, y))  # caption 0 is the empty prompt

    def recorded(self, cfg: TrainConfig) -> dict:
        return {"text_encoder": encoder_record(cfg.text_encoder, cfg.text_max_length)}

    def grid_condition(self, dataset, config, device) -> tuple[TextCondition, int]:
        """The dataset's demo prompts (or its first captions), twice."""
        prompts = list(getattr(dataset, "demo_prompts", dataset.captions[1:11]))
        if self.encoder is None:
            self.encoder = TextEncoder(self.cfg.text_encoder, device, self.cfg.text_max_length)
        return self.encoder.encode(prompts * 2), len(prompts)
