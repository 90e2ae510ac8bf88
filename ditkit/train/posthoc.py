"""Post-hoc EMA (Karras et al. 2024, EDM2, section 3): during training keep a few power-function
EMAs of the weights and save snapshots of them now and then; afterwards, reconstruct the EMA of
any length as a weighted sum of the snapshots, and choose the length by measuring, not before.

A power EMA of exponent gamma at step t weighs the weights of step tau <= t by
    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),
an average over the last part of the run whose relative width (its standard deviation over t) is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). The weights of snapshot k are the
integral of p_k against the trajectory, so the EMA of another (t, gamma) is approached by the
snapshots' combination x whose profile sum_k x_k p_k is nearest to it in L2, with A_kl = <p_k, p_l>
and b_k = <p_k, p_target> (integrals with closed forms) and the coefficients summing to one, so
that what never changed in training (a fixed position table) comes back exactly.

Snapshots live in RUN/ema/sigma-S/NNNNNNN.safetensors (S = sigma_rel with three decimals).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..utils.io import atomic_write, safetensors_save

SNAPSHOTS = "ema"  # under the run folder
PROFILE_RE = re.compile(r"^sigma-(\d+\.\d+)$")
STEP_RE = re.compile(r"^(\d{7})\.safetensors$")


def sigma_to_gamma(sigma_rel: float) -> float:
    """The power EMA's exponent for relative width sigma_rel: the largest real root of
    sigma^2 (g + 2)^2 (g + 3) = g + 1, a cubic in g."""
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = roots[np.abs(roots.imag) < 1e-9].real
    if not 0 < sigma_rel < 0.28 or not len(real) or real.max() <= -0.5:
        raise ValueError(f"an EMA length (sigma_rel) must lie in (0, 0.28), got {sigma_rel:g}; EDM2 keeps 0.05 and 0.10.")
    return float(real.max())


def gamma_to_sigma(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def profile_products(t1: np.ndarray, g1: np.ndarray, t2: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """<p_(t1, g1), p_(t2, g2)> for every pair (rows: the first profiles, columns: the second)."""
    t1, g1, t2, g2 = (np.asarray(v, dtype=np.float64) for v in (t1, g1, t2, g2))
    t1, g1, t2, g2 = t1[:, None], g1[:, None], t2[None, :], g2[None, :]
    g = g1 + g2 + 1
    m = np.minimum(t1, t2)
    return (g1 + 1) * (g2 + 1) / g * m**g / (t1 ** (g1 + 1) * t2 ** (g2 + 1))


def solve_weights(times, gammas, target_time: float, target_gamma: float) -> np.ndarray:
    """The coefficients (summing to one) of the snapshots (times, gammas) whose combined profile is
    nearest the target's: min x'Ax - 2b'x subject to sum(x) = 1, solved with its Lagrange
    multiplier. Times are rescaled by target_time first, so the powers stay in range."""
    t = np.asarray(times, dtype=np.float64) / target_time
    g = np.asarray(gammas, dtype=np.float64)
    n = len(t)
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = profile_products(t, g, t, g)
    kkt[:n, n] = kkt[n, :n] = 1
    rhs = np.append(profile_products(t, g, np.ones(1), np.array([target_gamma]))[:, 0], 1.0)
    return np.linalg.lstsq(kkt, rhs, rcond=None)[0][:n]


def snapshot_path(run: Path, sigma_rel: float, step: int) -> Path:
    return run / SNAPSHOTS / f"sigma-{sigma_rel:.3f}" / f"{step:07d}.safetensors"


def save_snapshot(run: Path, sigma_rel: float, step: int, state: dict[str, torch.Tensor]) -> None:
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    atomic_write(snapshot_path(run, sigma_rel, step), lambda p: safetensors_save(state, p, metadata={"sigma_rel": f"{sigma_rel:g}", "step": str(step)}))


def list_snapshots(run: Path) -> list[tuple[float, int, Path]]:
    """(sigma_rel, step, file) of every snapshot in RUN/ema/, by step then width."""
    found = []
    for folder in sorted((run / SNAPSHOTS).glob("sigma-*")):
        m = PROFILE_RE.match(folder.name)
        if m:
            found += [(float(m.group(1)), int(s.group(1)), f) for f in folder.iterdir() if (s := STEP_RE.match(f.name))]
    return sorted(found, key=lambda x: (x[1], x[0]))


def reconstruct(run: Path, sigma_rel: float, step: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of the power EMA of width sigma_rel at `step` (default: the last snapshot's) from
    the run's snapshots up to that step, and a summary (how many snapshots, the fit's error: the
    relative L2 distance between the reconstructed profile and the target's)."""
    snaps = list_snapshots(run)
    if not snaps:
        raise FileNotFoundError(f"{run} holds no EMA snapshots ({SNAPSHOTS}/sigma-*/NNNNNNN.safetensors); train with --ema-profiles 0.05 0.10.")
    last = max(s for _, s, _ in snaps)
    step = last if step is None else step
    used = [x for x in snaps if x[1] <= step]
    if not used:
        raise ValueError(f"{run} has no EMA snapshot at or before step {step} (the first is at step {snaps[0][1]}); pass a later --step.")
    gamma = sigma_to_gamma(sigma_rel)
    times = [s for _, s, _ in used]
    gammas = [sigma_to_gamma(w) for w, _, _ in used]
    x = solve_weights(times, gammas, step, gamma)
    t = np.asarray(times, dtype=np.float64) / step
    g = np.asarray(gammas)
    target = profile_products(np.ones(1), np.array([gamma]), np.ones(1), np.array([gamma]))[0, 0]
    residual = x @ profile_products(t, g, t, g) @ x - 2 * x @ profile_products(t, g, np.ones(1), np.array([gamma]))[:, 0] + target
    out: dict[str, torch.Tensor] = {}
    for coef, (_, _, path) in zip(x, used):
        for k, v in load_file(str(path)).items():
            v = v.double() * float(coef)
            out[k] = out[k] + v if k in out else v
    state = {k: v.float() for k, v in out.items()}
    return state, {"sigma_rel": sigma_rel, "step": step, "snapshots": len(used), "fit_error": float(np.sqrt(max(residual, 0) / target))}
