"""Where a run starts: its own checkpoint (--resume, with the run's settings) or another model's
weights (--init-from, with that model's architecture and objective)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..checkpoints import Checkpoint, infer_config, read_checkpoint
from ..config import DiTConfig, ObjectiveConfig, TrainConfig, UViTConfig, field_default, flag, leaf_fields
from ..utils.io import read_pt
from ..utils.runs import BUNDLED_NAME, find_checkpoint, resume_checkpoint

# Settings a resumed run may change: when it stops, how often it logs and saves, how it runs on
# this machine. Every other setting shapes the numbers and must stay the run's own.
RESUME_FREE = ("max_steps", "max_minutes", "fit_to_minutes", "epochs", "log_every", "ckpt_every", "sample_every", "keep_last", "keep_every",
               "default_sampler", "default_steps", "default_cfg_scale", "default_cfg_interval",
               "num_workers", "on_bad_image", "precision", "compile", "grad_checkpointing", "parallel")  # fmt: skip
# Where this command runs and what it resumes: never taken from the checkpoint.
LOCAL_SETTINGS = ("device", "results_dir", "resume")
# Objective settings that define what a network predicts: a fine-tune must keep its base's.
MODEL_OBJECTIVE = ("objective", "path", "time_scale", "prediction")


def read_training_checkpoint(path: Path) -> dict:
    ck = read_pt(path)
    for key in ("model", "ema", "opt", "step", "args"):
        if not isinstance(ck, dict) or key not in ck:
            raise ValueError(f"{path} has no {key!r}: it is not a ditkit training checkpoint; pass one from RESULTS_DIR/NNN-MODEL/checkpoints.")
    if not isinstance(ck["args"], dict):
        raise ValueError(f"{path} does not record ditkit's settings: it is not a ditkit training checkpoint; pass one from RESULTS_DIR/NNN-MODEL/checkpoints.")
    return ck


def resume_config(cfg, saved: dict, source: Path, free: tuple[str, ...] = RESUME_FREE, effective: dict | None = None):
    """The settings of the run that `source` continues (a TrainConfig, or another config of the same
    kind): the saved ones, except where `cfg` gives a value other than the default, which may change
    only the `free` settings (a differing value of any other setting is refused, naming the flag and
    the run's value: where it was left unset, the one `effective` records, such as the preset's depth
    in the model config). So a bare --resume continues the run."""
    cls = type(cfg)
    shown = lambda name: saved[name] if saved[name] is not None else (effective or {}).get(name, "unset")  # noqa: E731
    merged, conflicts = {}, []
    for f in leaf_fields(cls):
        now = getattr(cfg, f.name)
        if f.name in LOCAL_SETTINGS or f.name not in saved:
            merged[f.name] = now
        elif now == saved[f.name] or now == field_default(cls, f.name):
            merged[f.name] = saved[f.name]
        elif f.name in free:
            merged[f.name] = now
        else:
            conflicts.append(f"{flag(f.name)} {now} (the run's: {shown(f.name)})")
    if conflicts:
        raise ValueError(f"{source} was trained with other settings: {'; '.join(conflicts)}; drop those flags to continue the run, "
                         "or leave out --resume to start a new one.")  # fmt: skip
    return cls(**merged)


def resume_note(given: TrainConfig, merged: TrainConfig, saved: dict) -> str:
    """" (from the run: depth 1, ...; changed: max_steps 4 -> 8)": what a resume took from the
    checkpoint beyond this command's values, and what this command changed."""
    now = merged.flat()
    kept = [f"{k} {v}" for k, v in now.items() if k not in LOCAL_SETTINGS and v != getattr(given, k)]
    changed = [f"{k} {saved[k]} -> {v}" for k, v in now.items() if k in RESUME_FREE and k in saved and saved[k] != v]
    parts = [f"from the run: {', '.join(kept)}"] * bool(kept) + [f"changed: {', '.join(changed)}"] * bool(changed)
    return f" ({'; '.join(parts)})" if parts else ""


def base_objective(cfg: TrainConfig, recorded: dict, source: Path) -> TrainConfig:
    """`cfg` with the --init-from model's objective settings wherever a flag is at its default; a
    flag that would change what the network predicts is refused in one sentence."""
    base = ObjectiveConfig(**recorded)
    merged = {}
    for f in fields(ObjectiveConfig):
        now, theirs = getattr(cfg, f.name), getattr(base, f.name)
        if now == field_default(TrainConfig, f.name):
            merged[f.name] = theirs
        elif f.name in MODEL_OBJECTIVE and now != theirs:
            raise ValueError(f"--init-from {source} is a model with {f.name} {theirs}; drop {flag(f.name)} {now} to fine-tune it.")
    return cfg.replace(**merged)


def base_model_config(base, cfg: TrainConfig, num_classes: int, input_size: int, in_channels: int) -> DiTConfig | UViTConfig:
    """The --init-from model's config, after checking that the data fits it (one sentence if not)."""
    c = base.config or infer_config(base.state)
    if not isinstance(c, (DiTConfig, UViTConfig)) or not c.num_real_classes:
        raise ValueError(f"--init-from {base.path} is not a class-conditional DiT or U-ViT; pass a DiT or U-ViT model folder, run folder or checkpoint.")
    if (in_channels, input_size) != (c.in_channels, c.input_size):
        raise ValueError(f"{cfg.data_path} gives {in_channels}-channel inputs of {input_size}x{input_size}, but --init-from {base.path} "
                         f"takes {c.in_channels}-channel {c.input_size}x{c.input_size}; pass --image-size and --channels to match it.")  # fmt: skip
    if num_classes > c.num_real_classes or (cfg.num_classes is not None and cfg.num_classes != c.num_real_classes):
        raise ValueError(f"the data has {num_classes} classes but --init-from {base.path} has {c.num_real_classes}; a fine-tune keeps its base's "
                         f"classes, so use data with at most {c.num_real_classes} classes (and leave --num-classes unset).")  # fmt: skip
    return c


def resolve_resume(cfg: TrainConfig) -> tuple[TrainConfig, Path | None, dict | None, str]:
    """(the settings to train with, the checkpoint resumed from, its contents, a note on what the
    resume took and changed) for --resume; `cfg` itself and Nones without it."""
    if not cfg.resume:
        return cfg, None, None, ""
    path = resume_checkpoint(cfg.resume, Path(cfg.results_dir))
    state = read_training_checkpoint(path)
    recorded = state.get("model_config")
    merged = resume_config(cfg, state["args"], path, effective=recorded if isinstance(recorded, dict) else None)
    return merged, path, state, resume_note(cfg, merged, state["args"])


def resolve_base(cfg: TrainConfig) -> tuple[TrainConfig, Checkpoint | None, str | None]:
    """(the settings with the base's objective merged in, the --init-from checkpoint, the name its
    adapter records for it: 'bundled' stays a name, other paths become absolute); Nones without it."""
    if not cfg.init_from:
        return cfg, None, None
    path = find_checkpoint(cfg.init_from)
    base = read_checkpoint(path)
    name = BUNDLED_NAME if cfg.init_from == BUNDLED_NAME and not Path(cfg.init_from).exists() else str(path.resolve())
    return base_objective(cfg, base.meta.get("objective", {"objective": "gaussian"}), path), base, name
