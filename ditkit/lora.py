"""LoRA adapters on a DiT, through peft: add them for training, save only them, apply or merge them.

An adapter folder is peft's: `adapter_model.safetensors` (the lora_A / lora_B matrices, peft's key
names) and `adapter_config.json` (a LoraConfig; base_model_name_or_path is the base checkpoint).
The safetensors metadata also records the base model's DiTConfig, so an adapter put on another
model is refused in one sentence before any weight is touched. peft is imported on first use.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .checkpoints import config_from_dict, describe
from .config import AdapterRecord, from_record
from .utils.io import atomic_write, read_json, safetensors_save

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's file names
BASE_CONFIG_KEY = "ditkit_base_config"  # safetensors metadata: the base model's config, as JSON
# The linear layers of a DiT block (both MLP kinds) and the adaLN regressions (blocks and final layer).
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.w12", "mlp.w3", "adaLN_modulation.1")
# adapter_config.json entries that do not change what the adapter computes; every other one must be
# what ditkit writes (AdapterRecord's) or peft's default.
INERT_KEYS = ("peft_type", "peft_version", "task_type", "auto_mapping", "revision", "inference_mode")
SHAPE_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_classes",
                "learn_sigma", "block", "mlp")  # fmt: skip


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft; install it with pip install 'ditkit[lora]'.") from None
    return peft


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of target modules


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def resolve_targets(model: nn.Module, targets: tuple[str, ...] = ()) -> list[str]:
    """The module-name suffixes LoRA goes on: the given ones, each of which must name a Linear layer
    of `model`, or the DEFAULT_TARGETS the model has."""
    names = linear_names(model)
    if not targets:
        return [t for t in DEFAULT_TARGETS if any(_matches(n, t) for n in names)]
    for t in targets:
        if not any(_matches(n, t) for n in names):
            suffixes = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in names})
            raise ValueError(f"--lora-targets {t} names no Linear layer of this model; pick among {', '.join(suffixes)}.")
    return list(targets)


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] = (), base: str | None = None):
    """Put fresh LoRA matrices (B = 0, so the model is unchanged) on `model` in place and freeze
    everything else; returns the LoraConfig."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=resolve_targets(model, targets),
                             base_model_name_or_path=base)  # fmt: skip
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return config


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `model` under its own (injected) names: what training checkpoints hold."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """lora_state's tensors back into `model`, which must have exactly those LoRA layers."""
    own = lora_state(model)
    if set(state) != set(own) or any(own[k].shape != v.shape for k, v in state.items()):
        raise ValueError(f"{source} holds other LoRA layers than --lora-rank and --lora-targets make; resume with the run's settings.")
    model.load_state_dict(state, strict=False)


def lora_config(model: nn.Module):
    return model.peft_config["default"]


def save_adapter(model: nn.Module, folder: str | Path, base_config) -> Path:
    """peft's adapter folder of `model`'s LoRA (nothing of the base), each file written atomically."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}  # False: no hub look-up of the base
    meta = {"format": "pt", BASE_CONFIG_KEY: json.dumps(asdict(base_config))}
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: safetensors_save(state, p, metadata=meta))
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config(model).to_dict().items()}
    config["peft_type"] = str(config["peft_type"].value if hasattr(config["peft_type"], "value") else config["peft_type"])
    atomic_write(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return folder


@dataclass(frozen=True)
class Adapter:
    """A saved adapter: peft-named tensors, its LoraConfig, and the base it was trained on."""

    state: dict[str, torch.Tensor]
    config: object  # peft.LoraConfig
    base_config: object | None  # the base's DiTConfig; None for adapters not written by ditkit
    path: Path

    @property
    def base(self) -> str | None:
        """The base checkpoint recorded at training time ('bundled' or a path)."""
        return self.config.base_model_name_or_path


def read_adapter(path: str | Path) -> Adapter:
    """An adapter folder (or its adapter_model.safetensors), with one sentence when it is not one."""
    peft = _peft()
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    weights, config_file = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"LoRA adapter {path} does not exist; pass the adapter/ folder of a ditkit train --lora-rank or ditkit dpo run.")
    if not weights.is_file() or not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a LoRA adapter: it needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}; "
                                "pass the adapter/ folder of a ditkit train --lora-rank or ditkit dpo run.")  # fmt: skip
    try:
        state = load_file(str(weights))
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"cannot read the LoRA adapter {folder} ({type(e).__name__}); write it again.") from None
    saved = read_json(config_file)
    if isinstance(saved, dict) and saved.get("peft_type") != "LORA":
        raise ValueError(f"{folder} holds a {str(saved.get('peft_type'))[:40]} adapter, not LoRA; pass a LoRA adapter folder.")
    record = from_record(AdapterRecord, saved, str(config_file), strict=False)
    check_peft_defaults(saved, peft, config_file)
    config = peft.LoraConfig(r=record.r, lora_alpha=record.lora_alpha, target_modules=list(record.target_modules),
                             base_model_name_or_path=record.base_model_name_or_path)  # what ditkit writes, and nothing else
    base_config = None
    if BASE_CONFIG_KEY in meta:
        source = f"{weights}'s metadata"
        try:
            recorded = json.loads(meta[BASE_CONFIG_KEY])
        except ValueError:
            raise ValueError(f"{source}: {BASE_CONFIG_KEY} is not valid JSON; write the adapter again.") from None
        base_config = config_from_dict(recorded, source, f"{BASE_CONFIG_KEY}.")
    return Adapter(state, config, base_config, folder)


def _jsonable(value):
    """A peft setting as JSON writes it (sets as sorted lists, enums as their values)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", value)


def check_peft_defaults(saved: dict, peft, config_file: Path) -> None:
    """One sentence when adapter_config.json sets what ditkit never writes (init_lora_weights
    "pissa", DoRA, modules_to_save, ...): such a setting could change the base model's own weights."""
    defaults = {k: _jsonable(v) for k, v in peft.LoraConfig().to_dict().items()}
    for key, value in saved.items():
        if key in INERT_KEYS or key in AdapterRecord.__dataclass_fields__:
            continue
        default = defaults.get(key)
        if (key in defaults and _jsonable(value) != default) or (key not in defaults and value not in (None, False, {}, [], "")):
            raise ValueError(f"{config_file}: {key} is {str(value)[:40]!r}, which ditkit never writes (its adapters keep peft's default, "
                             f"{default!r}); use an adapter written by ditkit train --lora-rank or ditkit dpo.")  # fmt: skip


def check_fits(adapter: Adapter, model: nn.Module) -> None:
    """One sentence, naming both shapes and the fix, when `adapter` was made for another model."""
    base = f" ({adapter.base})" if adapter.base else ""
    fix = f"pass --ckpt with the model it was trained on{base}"
    c = adapter.base_config
    if c is not None and type(c) is type(model.config) and any(getattr(c, f, None) != getattr(model.config, f, None) for f in SHAPE_FIELDS):
        raise ValueError(f"the LoRA adapter {adapter.path} was made for {describe(c)}, but the checkpoint holds {describe(model.config)}; {fix}.")
    names = linear_names(model)
    for target in adapter.config.target_modules:
        if not any(_matches(n, target) for n in names):
            raise ValueError(f"{adapter.path / ADAPTER_CONFIG}: target_modules names {target[:40]!r}, no Linear layer of {describe(model.config)}; {fix}.")
    modules = dict(model.named_modules())
    for key, tensor in adapter.state.items():  # peft's names: PREFIX.lora_A.weight (r, in), PREFIX.lora_B.weight (out, r)
        prefix, _, kind = key.rpartition(".lora_")
        layer = modules.get(prefix)
        want = None
        if isinstance(layer, nn.Linear):
            want = (adapter.config.r, layer.in_features) if kind.startswith("A") else (layer.out_features, adapter.config.r)
        if want is None or tuple(tensor.shape) != want:
            found = f"{key} is {tuple(tensor.shape)} where {want} fits" if want else f"{prefix}, a layer it does not have"
            raise ValueError(f"the LoRA adapter {adapter.path} does not fit {describe(model.config)} ({found}); {fix}.")


def apply_adapter(model: nn.Module, adapter: Adapter, merge: bool = True) -> nn.Module:
    """`model` with the adapter's LoRA on it (checked first), merged into the base weights unless
    merge=False (then the LoRA layers stay, for training or adapter_disabled)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    check_fits(adapter, model)
    inject_adapter_in_model(adapter.config, model)
    result = set_peft_model_state_dict(model, adapter.state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing:  # the config names layers the weights do not cover
        raise ValueError(f"the LoRA adapter {adapter.path} lacks {len(missing)} of its layers' weights ({missing[0]}, ...); write it again.")
    model.requires_grad_(False)
    return merge_lora(model) if merge else model


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """W + (alpha / r) B A into each base Linear, the LoRA layers replaced by their base layers: a
    plain model again, whose state dict is the base's layout (save_pretrained writes a normal folder)."""
    for name, layer in lora_layers(model):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """The base model's forward inside the block (DPO's frozen reference), the adapter's after it."""
    layers = [m for _, m in lora_layers(model)]
    trainable = {p: p.requires_grad for p in model.parameters()}  # peft's enable_adapters resets requires_grad
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
