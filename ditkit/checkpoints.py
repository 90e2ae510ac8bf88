"""Loading and saving DiT (and U-ViT) weights, in every format ditkit reads.

Formats: the official release (`DiT-XL-2-256x256.pt`, a raw state dict; training checkpoints,
a dict with `model`/`ema`/`opt`/`args`, of which `ema` is taken), the official U-ViT release
(`imagenet256_uvit_huge.pth`, ..., raw state dicts told apart by their keys), ditkit's own, a folder
(or a `.safetensors` file) with `model.safetensors` and `config.json`, and (through ditkit.hub)
diffusers folders and Hugging Face Hub ids. `.pt`/`.pth` files are read with `weights_only=True`: no
arbitrary object is unpickled.

`ditkit.DiT` and `ditkit.UViT` are this module's: the networks of ditkit.models with
`from_pretrained` and `save_pretrained`, which need the formats and so live above the models.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import hub
from .config import PRESET_SIZES, UVIT_SIZES, DiTConfig, MMDiTConfig, ObjectiveConfig, RecordedSampling, TextEncoderRecord, UViTConfig, VideoDiTConfig, VideoMMDiTConfig, from_record
from .models import dit, uvit
from .models.mmdit import MMDiT, build_mmdit
from .models.video import VideoDiT
from .utils.devices import check_model_fits
from .utils.io import atomic_write, read_json, read_pt, safetensors_save
from .utils.runs import CONFIG_NAME, WEIGHTS_NAME, check_official_download

# What a ditkit checkpoint records beside the model config, and the config that checks each entry.
RECORDS = {"objective": ObjectiveConfig, "sampling": RecordedSampling, "text_encoder": TextEncoderRecord}
META_KEYS = tuple(RECORDS)
ModelConfig = DiTConfig | MMDiTConfig | UViTConfig | VideoDiTConfig

# How the official U-ViT code samples each released checkpoint (its eval scripts and configs):
# (img_size, in_chans, embed_dim, depth) -> (its file, the objective, the sampling). The H models
# were trained on Stable Diffusion's discrete schedule (the network sees n = k + 1) and sample with
# DPM-Solver++; the others on the continuous VP SDE (the network sees 999 t) and sample with
# DPM-Solver, the small pixel models with 1 000 Euler-Maruyama steps. Guidance: the official
# scale s is eps_c + s (eps_c - eps_u), ditkit's cfg_scale 1 + s, on every channel.
_SD_DISCRETE = {"objective": "gaussian", "betas": "scaled-linear", "time_offset": 1}
_VP = {"objective": "vp"}
UVIT_RELEASES = {
    (32, 3, 512, 12): ("cifar10_uvit_small.pth", _VP, {"sampler": "euler-maruyama", "num_sampling_steps": 1000, "cfg_scale": 1.0}),
    (64, 3, 512, 12): ("celeba64_uvit_small.pth", _VP, {"sampler": "euler-maruyama", "num_sampling_steps": 1000, "cfg_scale": 1.0}),
    (64, 3, 768, 16): ("imagenet64_uvit_mid.pth", _VP, {"sampler": "dpm-solver", "num_sampling_steps": 50, "cfg_scale": 1.0}),
    (64, 3, 1024, 20): ("imagenet64_uvit_large.pth", _VP, {"sampler": "dpm-solver", "num_sampling_steps": 50, "cfg_scale": 1.0}),
    (32, 4, 1024, 20): ("imagenet256_uvit_large.pth", _VP, {"sampler": "dpm-solver", "num_sampling_steps": 50, "cfg_scale": 1.4}),
    (64, 4, 1024, 20): ("imagenet512_uvit_large.pth", _VP, {"sampler": "dpm-solver", "num_sampling_steps": 50, "cfg_scale": 1.7}),
    (32, 4, 1152, 28): ("imagenet256_uvit_huge.pth", _SD_DISCRETE, {"sampler": "dpm-solver++", "num_sampling_steps": 50, "cfg_scale": 1.4}),
    (64, 4, 1152, 28): ("imagenet512_uvit_huge.pth", _SD_DISCRETE, {"sampler": "dpm-solver++", "num_sampling_steps": 50, "cfg_scale": 1.7}),
}  # fmt: skip


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
    config: ModelConfig | None
    meta: dict
    path: Path

    @property
    def official(self) -> bool:
        """An official DiT .pt: sampled with the official code's guidance on three channels."""
        return self.path.suffix == ".pt" and self.config is None and "x_embedder.proj.weight" in self.state


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Any supported format: a ditkit model folder (or its .safetensors), a ditkit training
    checkpoint (its EMA weights), an official DiT or SiT .pt (raw, or a training dict's EMA)."""
    path = Path(path)
    if not path.exists():
        check_official_download(path)
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
            saved = read_json(config_file)
            config = config_from_dict(saved, str(config_file))
            meta = read_records(saved, str(config_file))
        return Checkpoint(state, config, meta, path)
    obj = read_pt(path)
    saved = config_from_dict(obj["model_config"], str(path), "model_config.") if isinstance(obj, dict) and obj.get("model_config") is not None else None
    meta = read_records(obj, str(path)) if isinstance(obj, dict) else {}
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]  # official training checkpoint: sample from the EMA weights
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a DiT checkpoint: it holds no state dict of tensors.")
    if saved is None and not meta:
        meta = official_uvit_meta(obj)
    return Checkpoint(obj, saved, meta, path)  # ditkit training checkpoints carry their model config


def peek_config(path: Path) -> ModelConfig | None:
    """The model config a ditkit model folder's config.json records, read without the weights (None
    for other formats): what the flags can be checked against before anything large is read."""
    files = _ditkit_files(Path(path))
    return config_from_dict(read_json(files[1]), str(files[1])) if files and files[1].exists() else None


def config_from_dict(d: dict, source: str = "the model config", prefix: str = "") -> ModelConfig:
    """The model config a config.json (or a checkpoint's model_config) records, checked as flags
    are: an MMDiT's has a text width (context_dim) and a text-to-video MMDiT's frames too, a U-ViT's the official U-ViT names (embed_dim),
    a video DiT's its frames; other names the file records are skipped."""
    cls = DiTConfig  # what from_record names in its sentence when d is not a dict
    if isinstance(d, dict):
        text = VideoMMDiTConfig if "frames" in d else MMDiTConfig
        cls = text if "context_dim" in d else UViTConfig if "embed_dim" in d else VideoDiTConfig if "frames" in d else DiTConfig
    return from_record(cls, d, source, prefix, strict=False)


def read_records(saved: dict, source: str) -> dict:
    """The entries a checkpoint records beside the model config ("objective", "sampling",
    "text_encoder"), each checked by its config; kept as recorded."""
    for key, cls in RECORDS.items():
        if key in saved:
            from_record(cls, saved[key], source, f"{key}.")
    return {k: saved[k] for k in RECORDS if k in saved}


def infer_config(state: dict[str, torch.Tensor]) -> DiTConfig | UViTConfig | None:
    """The config a state dict was made for, read off its keys and shapes (None if it is neither a
    DiT nor a U-ViT)."""
    if "patch_embed.proj.weight" in state and "mid_block.attn.qkv.weight" in state:
        return infer_uvit_config(state)
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


def infer_uvit_config(state: dict[str, torch.Tensor]) -> UViTConfig | None:
    """The UViTConfig of an official U-ViT state dict. Heads are not in the shapes: the paper's count
    for its widths, else 64-wide heads. A label table of 1001 rows (or 11, 101: classes + 1) holds
    the null class of label dropout; the ImageNet 64 models' 1000 rows do not."""
    try:
        dim, cin, p, _ = state["patch_embed.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        depth = 2 * sum(1 for k in state if k.startswith("in_blocks.") and k.endswith(".norm1.weight"))
        fc1 = state["mid_block.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError):
        return None
    rows = state["label_emb.weight"].shape[0] if "label_emb.weight" in state else -1
    heads = {d: h for _, d, h in UVIT_SIZES.values()}.get(dim, max(1, dim // 64))
    side = int(round((tokens - 1 - (rows > 0)) ** 0.5)) * p
    return UViTConfig(
        img_size=side, patch_size=p, in_chans=cin, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=fc1 / dim,
        qkv_bias="mid_block.attn.qkv.bias" in state, mlp_time_embed="time_embed.0.weight" in state, num_classes=rows,
        conv="final_layer.weight" in state, skip=depth == 0 or "out_blocks.0.skip_linear.weight" in state,
        class_dropout_prob=0.1 if rows > 1 and rows % 10 == 1 else 0.0,
    )  # fmt: skip


def official_uvit_meta(state: dict[str, torch.Tensor]) -> dict:
    """What the official U-ViT code samples a released checkpoint with ({"objective", "sampling"});
    an unknown U-ViT gets the continuous VP SDE of the official train.py and train_ldm.py; {} for a DiT."""
    c = infer_config(state)
    if not isinstance(c, UViTConfig):
        return {}
    _, objective, sampling = UVIT_RELEASES.get((c.img_size, c.in_chans, c.embed_dim, c.depth), (None, _VP, {"sampler": "dpm-solver", "num_sampling_steps": 50}))
    return {"objective": dict(objective), "sampling": dict(sampling)}


def family(config) -> str:
    return "U-ViT" if isinstance(config, UViTConfig) else "MMDiT" if isinstance(config, MMDiTConfig) else "DiT"


def count(n: int, noun: str) -> str:
    """"1 channel", "3 channels", "10 classes"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def describe(config: ModelConfig) -> str:
    """"DiT-XL/2 at 256 px (latent 32), 1000 classes" or the raw sizes for a custom config."""
    size = f"{config.input_size * 8} px (latent {config.input_size})" if config.in_channels == 4 else f"{config.input_size} px"
    if isinstance(config, UViTConfig):
        name = next((f"U-ViT-{s}/{config.patch_size}" for s, (d, w, _) in UVIT_SIZES.items() if (d, w) == (config.depth, config.embed_dim)),
                    f"a custom U-ViT (depth {config.depth}, width {config.embed_dim}, patch {config.patch_size})")  # fmt: skip
        labels = (count(config.num_real_classes, "class") + (" + null" if config.null_class is not None else "")) if config.conditional else "unconditional"
        return f"{name} at {size}, {count(config.in_channels, 'channel')}, {labels}"
    if isinstance(config, VideoMMDiTConfig):
        return (f"a text-to-video MMDiT (depth {config.depth}, hidden {config.hidden_size}, tubelets {config.tubelet}x{config.patch_size}x{config.patch_size}) "
                f"on {config.frames} frames of {config.input_size} px, {count(config.in_channels, 'channel')}, text {config.context_dim} wide")  # fmt: skip
    if isinstance(config, MMDiTConfig):
        return (f"an MMDiT (depth {config.depth}, hidden {config.hidden_size}, patch {config.patch_size}) at {config.input_size} px input, "
                f"{count(config.in_channels, 'channel')}, text {config.context_dim} wide")  # fmt: skip
    if isinstance(config, VideoDiTConfig):
        return (f"a video DiT (depth {config.depth}, hidden {config.hidden_size}, tubelets {config.tubelet}x{config.patch_size}x{config.patch_size}, "
                f"{config.attention} attention) on {config.frames} frames of {config.input_size} px, {count(config.num_classes, 'class')}")  # fmt: skip
    name = next(
        (f"DiT-{s}/{config.patch_size}" for s, (d, h, n) in PRESET_SIZES.items()
         if (d, h) == (config.depth, config.hidden_size) and config.patch_size in (2, 4, 8)),
        f"a custom DiT (depth {config.depth}, hidden {config.hidden_size}, patch {config.patch_size})",
    )  # fmt: skip
    return f"{name} at {size}, {count(config.in_channels, 'channel')}, {count(config.num_classes, 'class')}"


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
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
        if like is not None and family(like) != family(model.config):
            raise ValueError(f"{source} holds {describe(like)}, not a {family(model.config)}; pass a {family(like)} preset as --model "
                             f"({'U-ViT-*' if isinstance(like, UViTConfig) else 'DiT-*'}) or drop --model to use the checkpoint's own.")  # fmt: skip
        hint = f"; it looks like {describe(like)}" if like else "; it does not look like a DiT or U-ViT checkpoint"
        raise ValueError(f"{source} does not fit {describe(model.config)}: {'; '.join(parts)}{hint}. Pick the matching --model, --image-size and --num-classes.")
    model.load_state_dict(state, strict=True)


class UViT(uvit.UViT):
    """The U-ViT of ditkit.models with the Hugging Face way of loading and saving it."""

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike) -> UViT:
        """A U-ViT in eval mode from a ditkit folder or an official U-ViT .pth (loaded strict)."""
        model = load_pretrained(name)
        if not isinstance(model, uvit.UViT):
            raise ValueError(f"{name} holds {describe(model.config)}, not a U-ViT; load it with ditkit.DiT.from_pretrained.")
        return model

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """folder/model.safetensors + folder/config.json (the UViTConfig), which from_pretrained reads."""
        return save_pretrained(self, self.config, folder)


class DiT(dit.DiT):
    """The DiT of ditkit.models with the Hugging Face way of loading and saving it."""

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike) -> DiT:
        """A DiT in eval mode from a ditkit folder, an official .pt, a diffusers DiTPipeline or
        DiTTransformer2DModel folder, or the Hugging Face Hub id of any of these (fetched while online)."""
        return load_pretrained(name)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """folder/model.safetensors + folder/config.json (the DiTConfig), which from_pretrained reads."""
        return save_pretrained(self, self.config, folder)


def read_any(name: str | os.PathLike) -> Checkpoint:
    """Every format ditkit reads, by path or Hub id."""
    path = hub.resolve(name)
    if hub.is_diffusers(path):
        config, state, meta = hub.read_diffusers(path)
        return Checkpoint(state, config, read_records(meta, str(path / hub.DITKIT_RECORD)), path)
    if path.is_dir() and not (path / WEIGHTS_NAME).exists():
        pts = sorted(path.glob("*.pt"))  # a Hub repository of an official .pt
        if len(pts) == 1:
            return read_checkpoint(pts[0])
    return read_checkpoint(path)


def load_pretrained(name: str | os.PathLike) -> DiT:
    """`DiT.from_pretrained`: a DiT in eval mode from any format ditkit reads, by path or Hub id."""
    return load_model(read_any(name))


def load_model(path: str | Path | Checkpoint, config: ModelConfig | None = None) -> DiT | MMDiT | UViT | VideoDiT:
    """A DiT (or MMDiT, U-ViT or video DiT) with the checkpoint's weights: `config` if given, else the
    checkpoint's own config (ditkit format) or the config read off its shapes (official files)."""
    ck = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    config = config or ck.config or infer_config(ck.state)
    if config is None:
        raise ValueError(f"{ck.path} is not a DiT checkpoint: no DiT parameters were found in it.")
    files = _ditkit_files(ck.path)
    check_model_fits(config, torch.device("cpu"), source=f"{files[1] if files else ck.path}: ")  # built on the CPU first
    model = (build_mmdit(config) if isinstance(config, MMDiTConfig) else UViT(config) if isinstance(config, UViTConfig)
             else VideoDiT(config) if isinstance(config, VideoDiTConfig) else DiT(config))  # fmt: skip
    load_state_strict(model, ck.state, source=f"checkpoint {ck.path}")
    return model.eval()


def save_pretrained(model_or_state, config: ModelConfig, folder: str | Path, extra: dict | None = None) -> Path:
    """ditkit's format: folder/model.safetensors + folder/config.json (DiTConfig fields + extra)."""
    folder = Path(folder)
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    atomic_write(folder / WEIGHTS_NAME, lambda p: safetensors_save(state, p))
    meta = {**asdict(config), **(extra or {})}
    atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return folder
