"""Loading and saving DiT weights.

Formats: the official release (`DiT-XL-2-256x256.pt`, a raw state dict; training checkpoints,
a dict with `model`/`ema`/`opt`/`args`, of which `ema` is taken), and ditkit's own, a folder
(or a `.safetensors` file) with `model.safetensors` and `config.json`. `.pt` files are read
with `weights_only=True`: no arbitrary object is unpickled.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import load_file

from .config import MMDiTConfig
from .models import PRESET_SIZES, DiT, DiTConfig
from .models.mmdit import MMDiT

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
META_KEYS = ("objective", "sampling", "text_encoder")  # what a ditkit checkpoint records beside the model config
TMP_SUFFIX = ".tmp"  # atomic_write's temporaries: .NAME.XXXXXXXX.tmp beside NAME


def read_pt(path: str | Path) -> dict:
    """torch.load with weights_only=True; official training checkpoints carry an argparse.Namespace."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(
            f"cannot read checkpoint {path}: it is not a PyTorch file of tensors ({type(e).__name__}); "
            "check that the download finished and the path is right."
        ) from None


def _ditkit_files(path: Path) -> tuple[Path, Path] | None:
    if path.is_dir():
        return path / WEIGHTS_NAME, path / CONFIG_NAME
    if path.suffix == ".safetensors":
        return path, path.with_name(CONFIG_NAME)
    return None


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds: the weights, the model config (None for official files, whose
    config is read off the shapes) and what ditkit records beside them ("objective", "sampling")."""

    state: dict[str, torch.Tensor]
    config: DiTConfig | None
    meta: dict
    path: Path

    @property
    def official(self) -> bool:
        return self.path.suffix == ".pt" and self.config is None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Any supported format: a ditkit model folder (or its .safetensors), a ditkit training
    checkpoint (its EMA weights), an official DiT or SiT .pt (raw, or a training dict's EMA)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .pt file or a ditkit model folder.")
    files = _ditkit_files(path)
    if files is not None:
        weights, config_file = files
        if not weights.exists():
            raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME}; point --ckpt at a folder written by ditkit.")
        try:
            state = load_file(str(weights))
        except Exception as e:
            raise ValueError(f"cannot read {weights}: not a valid safetensors file ({e}); re-export the model.") from None
        config, meta = None, {}
        if config_file.exists():
            saved = json.loads(config_file.read_text())
            config = config_from_dict(saved)
            meta = {k: saved[k] for k in META_KEYS if k in saved}
        return Checkpoint(state, config, meta, path)
    obj = read_pt(path)
    saved = config_from_dict(obj["model_config"]) if isinstance(obj, dict) and isinstance(obj.get("model_config"), dict) else None
    meta = {k: obj[k] for k in META_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)}
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]  # official training checkpoint: sample from the EMA weights
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a DiT checkpoint: it holds no state dict of tensors.")
    return Checkpoint(obj, saved, meta, path)  # ditkit training checkpoints carry their model config


def config_from_dict(d: dict) -> DiTConfig | MMDiTConfig:
    """The model config a config.json records: an MMDiT's has a text width (context_dim)."""
    cls = MMDiTConfig if "context_dim" in d else DiTConfig
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def infer_config(state: dict[str, torch.Tensor]) -> DiTConfig | None:
    """The DiTConfig a state dict was made for, read off its shapes (None if it is not a DiT)."""
    try:
        hidden, cin, p, _ = state["x_embedder.proj.weight"].shape
        num_patches = state["pos_embed"].shape[1]
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        out = state["final_layer.linear.weight"].shape[0] // (p * p)
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        fc1 = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError):
        return None
    heads = {h: n for _, h, n in PRESET_SIZES.values()}.get(hidden, max(1, hidden // 64))
    if "blocks.0.adaLN_modulation.1.weight" in state:
        block = "adaln_zero" if state["blocks.0.adaLN_modulation.1.weight"].shape[0] == 6 * hidden else "adaln"
    else:
        block = "cross_attn" if "blocks.0.cross_attn.q.weight" in state else "in_context"
    # One extra embedding row is the null label, present whenever label dropout was on.
    num_classes, dropout = (rows - 1, 0.1) if rows > 1 else (rows, 0.0)
    return DiTConfig(
        input_size=int(round(num_patches**0.5)) * p, patch_size=p, in_channels=cin, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=fc1 / hidden, class_dropout_prob=dropout, num_classes=num_classes,
        learn_sigma=out == 2 * cin, block=block,
    )  # fmt: skip


def describe(config: DiTConfig | MMDiTConfig) -> str:
    """"DiT-XL/2 at 256 px (latent 32), 1000 classes" or the raw sizes for a custom config."""
    if isinstance(config, MMDiTConfig):
        return (f"an MMDiT (depth {config.depth}, hidden {config.hidden_size}, patch {config.patch_size}) at {config.input_size} px input, "
                f"{config.in_channels} channels, text {config.context_dim} wide")  # fmt: skip
    name = next(
        (f"DiT-{s}/{config.patch_size}" for s, (d, h, n) in PRESET_SIZES.items()
         if (d, h) == (config.depth, config.hidden_size) and config.patch_size in (2, 4, 8)),
        f"a custom DiT (depth {config.depth}, hidden {config.hidden_size}, patch {config.patch_size})",
    )  # fmt: skip
    size = f"{config.input_size * 8} px (latent {config.input_size})" if config.in_channels == 4 else f"{config.input_size} px"
    return f"{name} at {size}, {config.in_channels} channels, {config.num_classes} classes"


def load_state_strict(model: DiT, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict(strict=True), failing with one sentence that says what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        like = infer_config(state)
        hint = f"; it looks like {describe(like)}" if like else "; it does not look like a DiT checkpoint"
        raise ValueError(f"{source} does not fit {describe(model.config)}: {'; '.join(parts)}{hint}. Pick the matching --model, --image-size and --num-classes.")
    model.load_state_dict(state, strict=True)


def load_model(path: str | Path | Checkpoint, config: DiTConfig | MMDiTConfig | None = None) -> DiT | MMDiT:
    """A DiT (or MMDiT) with the checkpoint's weights: `config` if given, else the checkpoint's own
    config (ditkit format) or the config read off its shapes (official files)."""
    ck = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    config = config or ck.config or infer_config(ck.state)
    if config is None:
        raise ValueError(f"{ck.path} is not a DiT checkpoint: no DiT parameters were found in it.")
    model = MMDiT(config) if isinstance(config, MMDiTConfig) else DiT(config)
    load_state_strict(model, ck.state, source=f"checkpoint {ck.path}")
    return model.eval()


class NoSpaceError(OSError):
    """The disk filled up during an atomic write; the file it was replacing is untouched."""


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path), fsync it, rename it over `path` and fsync the folder: a crash or a power
    loss leaves the old file or the new one, never half of one. A full disk raises NoSpaceError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself reaches the disk
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"no space left on {path.parent} while writing {path.name}") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(folder: str | Path, name: str = "*") -> None:
    """Delete what interrupted atomic writes of `folder/name` left behind (.NAME.XXXXXXXX.tmp, each
    as large as the file it was to become)."""
    for tmp in Path(folder).glob(f".{name}.*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def torch_save(obj, path: str | Path) -> None:
    """torch.save through a Python file, so a full disk raises OSError(ENOSPC) and not torch's
    "unexpected pos" RuntimeError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def safetensors_save(state: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' bytes written through a Python file: its own save_file can miss a write error."""
    with open(path, "wb") as f:
        f.write(safetensors.torch.save(state, metadata=metadata))


def save_pretrained(model_or_state, config: DiTConfig | MMDiTConfig, folder: str | Path, extra: dict | None = None) -> Path:
    """ditkit's format: folder/model.safetensors + folder/config.json (DiTConfig fields + extra)."""
    folder = Path(folder)
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    atomic_write(folder / WEIGHTS_NAME, lambda p: safetensors_save(state, p))
    meta = {**asdict(config), **(extra or {})}
    atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return folder
