"""Which device and which precision a command runs in."""

from __future__ import annotations

import contextlib
import os
from dataclasses import fields

import torch

from ..config import field_default

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N or auto, as a device; one sentence for anything else or a missing GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} was asked for but no CUDA GPU is available; use --device cpu.")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 or bf16; "auto" takes bf16 autocast where bf16 matmuls are fast: a CUDA GPU that supports
    them, or a CPU with AMX tiles or AVX512-BF16 (with AMX bf16 trains about twice as fast; with
    AVX512-BF16 alone, on a 2-core AMD EPYC, 1.7x; without either it runs several times slower than fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return "bf16" if any(probe is not None and probe() for probe in probes) else "fp32"  # private in torch 2.x: absent means unknown


def autocast(device: torch.device | str, precision: str):
    """torch.autocast in `precision` (fp32: no autocast at all)."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(DTYPES)}.")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def loader_workers(requested: int | None) -> int:
    """Data-loader processes: the number asked for, else 4, or as many as the cores this process may
    run on where they are fewer (more would only wait, and DataLoader warns of them)."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


def memory_bytes(device: torch.device) -> int:
    """The memory a network on `device` can use: the GPU's own and this machine's RAM (where it is
    built first), whichever is less."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cuda":
        return min(ram, torch.cuda.get_device_properties(device).total_memory)
    return ram


def _size(n: float) -> str:
    return next(f"{n / 1024**k:.3g} {unit}" for k, unit in ((4, "TB"), (3, "GB"), (2, "MB"), (0, "bytes")) if n >= 1024**k or k == 0)


def check_model_fits(config, device: torch.device, batch: int = 1, source: str = "", names: dict[str, str] | None = None) -> None:
    """One sentence, before the network is built, when `config` makes one that `device` cannot hold:
    its float32 parameters, or the activations of a batch of `batch` images, past the device's
    memory. It names the field to blame (the one whose default shrinks the excess most), as
    `names` spells it (default: "FIELD VALUE"), after `source` (a file, or nothing for flags)."""
    if not hasattr(config, "footprint"):  # the study's U-Net baselines: sizes it chose itself
        return
    memory, (params, activations) = memory_bytes(device), config.footprint()
    where = f"{'this machine' if device.type == 'cpu' else device} has"
    own = {f.name for f in fields(config)}
    excess = [(0, 4 * params, f"a network of {params:.3g} parameters"),
              (1, 4 * activations * batch, f"activations of {activations * batch:.3g} floats per batch of {batch}")]  # fmt: skip
    for index, need, what in excess:
        if need > memory:
            culprit = min((f for f in config.SIZE_FIELDS if f in own), key=lambda f: config.footprint(**{f: field_default(type(config), f)})[index])
            named = (names or {}).get(culprit, f"{culprit} {getattr(config, culprit)}")
            raise ValueError(f"{source}{named} makes {what} ({_size(need)} in float32), more than the {_size(memory)} of memory {where}; "
                             "check the value, or pick a smaller one.")  # fmt: skip
