"""Small tensor helpers the objectives share."""

from __future__ import annotations

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the first: (N, ...) -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def expand_to(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values (N,) shaped to broadcast against x: (N, 1, ..., 1)."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))
