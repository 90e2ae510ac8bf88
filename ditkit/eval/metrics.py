"""Fréchet distance, Inception Score, precision and recall, as ADM's evaluator defines them; which
metrics an evaluation computes (`metric_plan`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from scipy.special import log_softmax, logsumexp

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3  # ADM's nhood_sizes=(3,)
PR_BATCH_SIZE = 10_000  # ADM's row/col batch sizes: memory only, not the result


@dataclass(frozen=True)
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> "FeatureStats":
        features = features.astype(np.float64)
        return cls(features.mean(0), np.cov(features, rowvar=False))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), ADM's (TTUR's) formula. The trace of
    the root is taken as sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), the same number as ADM's
    trace(sqrtm(S_a @ S_b)) from symmetric eigensolvers: faster, and exact for singular
    covariances where sqrtm needs ADM's eps fallback and can return imaginary parts."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"cannot compare {a.mu.shape[0]}-d and {b.mu.shape[0]}-d features; use the same feature network for both sets.")
    diff = a.mu - b.mu
    w, v = linalg.eigh(a.sigma)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T  # S_a^(1/2), symmetric
    tr_covmean = np.sqrt(linalg.eigvalsh(root_a @ b.sigma @ root_a).clip(0)).sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E KL(p(y|x) || p(y))) per split of `split_size` samples (the last may be shorter),
    averaged; in log space and float64, so confident predictions cannot give 0 * log 0."""
    logp = log_softmax(logits.astype(np.float64), axis=1)
    scores = []
    for i in range(0, len(logp), split_size):
        part = logp[i : i + split_size]
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))  # log mean_x p(y|x)
        kl = (np.exp(part) * (part - log_marginal)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)), computed as ADM does: norms minus 2ab, >= 0."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH_SIZE) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the set (itself excluded:
    it is the 0-th), kept blockwise as a running k+1 smallest."""
    radii = []
    for rows in features.split(batch_size):
        best = torch.full((len(rows), 0), float("inf"), device=features.device)
        for cols in features.split(batch_size):
            d = torch.cat([best, _sq_distances(rows, cols)], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH_SIZE,
                     device: torch.device | str = "cpu") -> tuple[float, float]:  # fmt: skip
    """Improved precision (share of samples inside some reference k-NN ball) and recall (share
    of reference points inside some sample k-NN ball); balls are closed (<=), as in ADM."""
    for n, what in ((len(ref), "reference images"), (len(samples), "samples")):
        if n <= k:
            raise ValueError(f"precision and recall need more than {k} {what} (the {k}-th nearest neighbour), got {n}.")
    r = torch.from_numpy(np.asarray(ref, dtype=np.float32)).to(device)
    s = torch.from_numpy(np.asarray(samples, dtype=np.float32)).to(device)
    radii_r, radii_s = manifold_radii(r, k, batch_size), manifold_radii(s, k, batch_size)
    ref_in = torch.zeros(len(r), dtype=torch.bool, device=device)
    sample_in = torch.zeros(len(s), dtype=torch.bool, device=device)
    for i in range(0, len(r), batch_size):
        for j in range(0, len(s), batch_size):
            d = _sq_distances(r[i : i + batch_size], s[j : j + batch_size])  # (refs, samples)
            ref_in[i : i + batch_size] |= (d <= radii_s[None, j : j + batch_size]).any(1)
            sample_in[j : j + batch_size] |= (d <= radii_r[i : i + batch_size, None]).any(0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


def metric_plan(asked: tuple[str, ...], every) -> tuple[list[str], list[str], Callable[[list[str], str], None]]:
    """What `ditkit eval` computes: (wanted, skipped, cannot). wanted is --metrics, or every metric when
    none is named; cannot(names, reason) drops those of names that cannot be computed here: an error
    when they were asked for by name, otherwise noted in skipped with the reason."""
    wanted, skipped = list(asked or every), []

    def cannot(names: list[str], reason: str) -> None:
        names = [m for m in names if m in wanted]
        if names and asked:
            raise ValueError(f"{reason}.")
        if names:
            skipped.append(reason)
            wanted[:] = [m for m in wanted if m not in names]

    return wanted, skipped, cannot
