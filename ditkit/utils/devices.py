"""Which device and which precision a command runs in."""

from __future__ import annotations

import contextlib

import torch

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
    them, or a CPU with AMX tiles (there bf16 trains about twice as fast; on CPUs without AMX it
    runs several times slower than fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: absent means unknown
    return "bf16" if device.type == "cpu" and amx is not None and amx() else "fp32"


def autocast(device: torch.device | str, precision: str):
    """torch.autocast in `precision` (fp32: no autocast at all)."""
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(DTYPES)}.")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
