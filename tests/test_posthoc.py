"""Post-hoc EMA (EDM2): the reconstruction against EMAs computed directly, the snapshots a run
keeps (and resumes), and `ditkit ema`."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditkit.cli import main
from ditkit.config import TrainConfig
from ditkit.train import Trainer
from ditkit.train.posthoc import gamma_to_sigma, list_snapshots, reconstruct, sigma_to_gamma, solve_weights
from ditkit.train.schedule import power_decay


def test_width_and_exponent():
    assert sigma_to_gamma(0.10) == pytest.approx(6.94, abs=0.01) and sigma_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    for sigma in (0.02, 0.1, 0.25):
        assert gamma_to_sigma(sigma_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-9)
    with pytest.raises(ValueError, match=r"must lie in \(0, 0.28\)"):
        sigma_to_gamma(0.3)


def test_reconstruction_matches_the_ema_computed_directly():
    """A trajectory of 3000 steps, two power EMAs (0.05, 0.10) snapshotted every 150 steps: the EMA of
    another width, at the end and part-way, comes back from the snapshots alone, where the widths
    kept only bracket it. A snapshot's own width and step give that snapshot exactly."""
    steps, every, kept = 3000, 150, (0.05, 0.10)
    tau = np.arange(1, steps + 1)
    theta = np.stack([np.sin(tau / 400), np.exp(-tau / 900), (tau / steps) ** 2 + 0.1 * np.cos(tau / 37)], 1)  # (steps, 3)

    def ema(sigma, upto):
        e, g = theta[0].copy(), sigma_to_gamma(sigma)
        for t in range(1, upto + 1):
            d = power_decay(g, t)
            e = d * e + (1 - d) * theta[t - 1]
        return e

    snaps = [(s, t, ema(s, t)) for t in range(every, steps + 1, every) for s in kept]
    for sigma, upto in [(0.075, steps), (0.15, steps), (0.075, 1800)]:
        used = [x for x in snaps if x[1] <= upto]
        x = solve_weights([t for _, t, _ in used], [sigma_to_gamma(s) for s, _, _ in used], upto, sigma_to_gamma(sigma))
        assert x.sum() == pytest.approx(1.0)
        rebuilt = sum(c * e for c, (_, _, e) in zip(x, used))
        direct = ema(sigma, upto)
        assert np.abs(rebuilt - direct).max() < 0.01, (sigma, upto, rebuilt, direct)
        assert np.abs(ema(0.10, upto) - direct).max() > 0.02  # the widths differ visibly: the test can fail
    x = solve_weights([t for _, t, _ in snaps], [sigma_to_gamma(s) for s, _, _ in snaps], steps, sigma_to_gamma(0.10))
    np.testing.assert_allclose(x, np.eye(len(snaps))[-1], atol=1e-6)


TINY = dict(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, log_every=1,
            global_batch_size=64, ema_schedule="power", ema_profiles=(0.05, 0.1), ema_snapshot_every=2, lr=1e-3)  # fmt: skip


def test_a_run_keeps_snapshots_that_resume_and_ditkit_ema_makes_model_folders(tmp_path, capsys):
    straight = Trainer(TrainConfig(**TINY, results_dir=str(tmp_path / "a"), max_steps=4, ckpt_every=4)).run()
    first = Trainer(TrainConfig(**TINY, results_dir=str(tmp_path / "b"), max_steps=2, ckpt_every=2)).run()
    resumed = Trainer(TrainConfig(results_dir=str(tmp_path / "b"), resume="latest", max_steps=4)).run()
    assert resumed == first
    assert [(s, t) for s, t, _ in list_snapshots(straight)] == [(0.05, 2), (0.1, 2), (0.05, 4), (0.1, 4)]
    for (_, _, a), (_, _, b) in zip(list_snapshots(straight), list_snapshots(resumed), strict=True):
        for k, v in load_file(str(a)).items():
            assert torch.equal(v, load_file(str(b))[k]), (a, k)
    # The run's power EMA of width 0.10 (gamma 6.94) is the 0.10 profile, step for step.
    model = load_file(str(straight / "model" / "model.safetensors"))
    profile = load_file(str(list_snapshots(straight)[-1][2]))
    torch.testing.assert_close(profile, model, rtol=1e-3, atol=1e-5)  # gamma 6.94 against sigma_to_gamma(0.1)
    first_ = load_file(str(list_snapshots(straight)[0][2]))
    assert any(not torch.equal(first_[k], profile[k]) for k in profile)

    assert main(["ema", "--run", str(straight), "--length", "0.1", "0.07"]) == 0
    assert "the EMA of length 0.07 at step 4 from 4 snapshots" in capsys.readouterr().out
    rebuilt = load_file(str(straight / "ema-0.100" / "model.safetensors"))
    torch.testing.assert_close(rebuilt, profile, rtol=0, atol=1e-6)
    meta = json.loads((straight / "ema-0.070" / "config.json").read_text())
    assert meta["ema"]["sigma_rel"] == 0.07 and meta["objective"] == {"objective": "gaussian"} and "sampling" in meta
    earlier = reconstruct(straight, 0.05, step=2)[0]
    torch.testing.assert_close(earlier, load_file(str(list_snapshots(straight)[0][2])), rtol=0, atol=1e-6)
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(straight / "ema-0.070"), "--num-sampling-steps", "2", "--out", str(out)]) == 0 and out.exists()

    assert main(["ema", "--run", str(tmp_path)]) == 2
    assert "holds no EMA snapshots" in capsys.readouterr().err
    assert main(["train", "--ema-profiles", "0.3", "--data-path", "digits"]) == 2
    assert "--ema-profiles must be less than 0.28" in capsys.readouterr().err
