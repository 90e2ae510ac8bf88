"""`ditkit study` end to end on 8x8 digits: results, plots, no retraining, kill and resume; the
U-Net baseline's interface and its sizing by multiply-adds."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import ditkit.study as study
from ditkit.cli import main
from ditkit.eval.npz import read_images
from ditkit.flops import measure
from ditkit.models import DiTConfig
from ditkit.config import StudyConfig, UNetConfig, scaled_sizes
from ditkit.models.unet import UNetBaseline
from ditkit.study import size_unet, unet_cost

# Two patch sizes, two more block designs and the U-Net: 5 runs of 4 steps, scored at 2 and 4.
# Divisors 32 and 12 shrink the presets to hidden 12 / depth 1; EMA 0 scores the raw weights,
# so the two evaluation steps of a run differ.
TINY = dict(data_path="digits", models=("DiT-S/2", "DiT-S/4"), blocks=("adaln", "cross_attn"), width_divisor=32,
            depth_divisor=12, steps=4, eval_every=2, num_eval_samples=16, num_sampling_steps=2, eval_batch_size=16,
            global_batch_size=8, ema_decay=0.0, log_every=2, num_workers=0, device="cpu")  # fmt: skip
RUNS = ("DiT-S-2-adaln_zero", "DiT-S-4-adaln_zero", "DiT-S-2-adaln", "DiT-S-2-cross_attn", "unet")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on busy cores


class CountingTrainer(study.Trainer):
    made: list = []

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        CountingTrainer.made.append((Path(cfg.results_dir).name, cfg.resume, self.step))


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def checkpoint_times(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/*/checkpoints/*.pt"))}


def test_study_end_to_end_rerun_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    monkeypatch.setattr(study, "Trainer", CountingTrainer)
    CountingTrainer.made = []
    args = ["study", "--out", str(out)]
    for k, v in TINY.items():
        flag = "--" + k.replace("_", "-")
        args += [flag, *v] if isinstance(v, tuple) else [flag, str(v)]
    assert main(args) == 0
    assert sorted(name for name, *_ in CountingTrainer.made) == sorted(RUNS)
    log = capsys.readouterr().out

    rows = read_rows(out)
    assert [(r["run"], int(r["step"])) for r in rows] == [(run, s) for run in RUNS for s in (2, 4)]
    by = {(r["run"], int(r["step"])): r for r in rows}
    info = study.data_info(StudyConfig(**TINY, out=str(out)))
    cost = measure(DiTConfig.from_preset("DiT-S/4", hidden_size=12, depth=1, input_size=8, in_channels=1, num_classes=10))
    assert (by["DiT-S-4-adaln_zero", 4]["patch"], int(by["DiT-S-4-adaln_zero", 4]["params"])) == ("4", cost.params)
    assert float(by["DiT-S-4-adaln_zero", 4]["gflops"]) == pytest.approx(cost.gflops)
    # The study and the Trainer print the same counts, the same way (the Trainer's: the trainable ones).
    assert f"DiT-S-4-adaln_zero: {cost.params:,} parameters ({cost.trainable_params:,} trainable)" in log
    assert f"| {cost.trainable_params:,} parameters |" in log
    assert by["unet", 2]["model"] == "U-Net" and by["unet", 2]["patch"] == "" and float(by["unet", 2]["gflops"]) > 0
    assert (info.input_size, info.in_channels, info.num_classes, info.fashion_mnist) == (8, 1, 10, False)
    for r in rows:
        assert 0 < float(r["fd_effnet"]) < math.inf
        assert r["accuracy"] == ""  # the classifier is for Fashion-MNIST only
    for run in RUNS:  # each step is scored with its own checkpoint
        assert by[run, 2]["fd_effnet"] != by[run, 4]["fd_effnet"], run
    saved = json.loads((out / "results.json").read_text())
    assert [(r["run"], r["step"]) for r in saved["rows"]] == [(r["run"], int(r["step"])) for r in rows]
    for name in ("fd_vs_steps.png", "fd_vs_gflops.png", "blocks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    arr = read_images(out / "runs" / "unet" / "samples" / "0000004.npz")
    assert arr.shape == (16, 8, 8, 1) and arr.labels is not None

    # The same command again: nothing is trained or rewritten, the results stay.
    times = checkpoint_times(out)
    assert len(times) == 2 * len(RUNS)
    CountingTrainer.made = []
    assert main(args) == 0
    assert CountingTrainer.made == []
    assert checkpoint_times(out) == times
    assert read_rows(out) == rows

    # Killed half-way through one run: its final checkpoint and done marker are gone. Only that run
    # trains again, from its step-2 checkpoint, and (resume being exact) scores as before.
    run_dir = out / "runs" / "DiT-S-2-adaln"
    (run_dir / "done.json").unlink()
    next(run_dir.glob("*/checkpoints/0000004.pt")).unlink()
    CountingTrainer.made = []
    assert main(args) == 0
    assert CountingTrainer.made == [("DiT-S-2-adaln", "latest", 2)]
    assert (run_dir / "done.json").exists()
    after = read_rows(out)
    assert [(r["run"], r["step"]) for r in after] == [(r["run"], r["step"]) for r in rows]
    for old, new in zip(rows, after):
        assert float(new["fd_effnet"]) == pytest.approx(float(old["fd_effnet"]), rel=1e-6), new["run"]
    changed = {k for k, t in checkpoint_times(out).items() if times.get(k) != t}
    assert changed == {str(p.relative_to(out)) for p in run_dir.glob("*/checkpoints/0000004.pt")}

    # A study folder keeps its settings; which runs it holds may change, and its budget may grow.
    with pytest.raises(ValueError, match="steps: 4 -> 2"):
        study.run_study(StudyConfig(**{**TINY, "steps": 2}, out=str(out)))
    with pytest.raises(ValueError, match="lr: 0.0001 -> 0.001"):
        study.run_study(StudyConfig(**{**TINY, "steps": 6, "lr": 1e-3}, out=str(out)))
    CountingTrainer.made = []
    study.run_study(StudyConfig(**{**TINY, "blocks": (), "unet": False}, out=str(out)))
    assert CountingTrainer.made == []
    CountingTrainer.made = []
    study.run_study(StudyConfig(**{**TINY, "blocks": (), "unet": False, "steps": 6}, out=str(out)))
    assert sorted(CountingTrainer.made) == [("DiT-S-2-adaln_zero", "latest", 4), ("DiT-S-4-adaln_zero", "latest", 4)]
    longer = {(r["run"], int(r["step"])): r for r in read_rows(out)}
    assert set(longer) == {(run, s) for run in RUNS[:2] for s in (2, 4, 6)}
    for key in by.keys() & longer.keys():  # the scores already taken are kept
        assert longer[key]["fd_effnet"] == by[key]["fd_effnet"], key


def test_study_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="width-divisor 5"):
        StudyConfig(width_divisor=5)
    with pytest.raises(ValueError, match="--models is 'DiT-M/2', not one of"):
        StudyConfig(models=("DiT-M/2",))
    with pytest.raises(ValueError, match="no runs"):
        StudyConfig(models=(), blocks=(), unet=False)
    assert scaled_sizes("DiT-B/4", 4, 2) == {"depth": 6, "hidden_size": 192, "num_heads": 12}
    assert scaled_sizes("DiT-S/2", 1, 24) == {"depth": 1, "hidden_size": 384, "num_heads": 6}


def test_unet_baseline_interface():
    config = UNetConfig(input_size=8, in_channels=1, num_classes=10, base_channels=8)
    torch.manual_seed(0)
    model = UNetBaseline(config)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    y = torch.tensor([0, 9, config.null_class])  # the null label has its own embedding row
    assert model(x, t, y).shape == (3, 2, 8, 8)
    assert model.unet.class_embedding.num_embeddings == 11
    assert config.block_out_channels == (8, 16)
    assert UNetConfig(input_size=32, in_channels=1, num_classes=10, base_channels=64).block_out_channels == (64, 128, 128)


def test_unet_macs_are_counted_and_sized_to_a_target():
    like = DiTConfig.from_preset("DiT-S/4", input_size=32, in_channels=1, num_classes=10)
    params, macs = unet_cost(UNetConfig.from_dit(like, 32))
    params2, macs2 = unet_cost(UNetConfig.from_dit(like, 64))
    # Convolutions dominate: twice the width is about four times the work and the parameters.
    assert 3.5 < macs2 / macs < 4.2 and 3.5 < params2 / params < 4.2
    assert macs > 100e6  # 32x32 convolutions at 32 channels: well over 1e8 multiply-adds
    target = measure(like).macs
    unet = size_unet(target, like, max_channels=128)
    assert (unet.input_size, unet.in_channels, unet.num_classes) == (32, 1, 10)
    assert 1 / 1.3 < unet_cost(unet)[1] / target < 1.3


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_is_scored_with_the_classifier():
    info = study.data_info(StudyConfig())
    assert (info.input_size, info.in_channels, info.num_classes, info.fashion_mnist) == (32, 1, 10, True)


def test_ema_longer_than_the_budget_is_warned(tmp_path, capsys):
    """EMA 0.999 over 20 steps keeps 98% of the initial weights: every run would score alike."""
    warning = study.ema_warning(StudyConfig(ema_decay=0.999, steps=20, eval_every=10))
    assert warning.startswith("--ema-decay 0.999 averages about 1000 steps, but each run trains 20: 98% of the scored EMA weights")
    assert "use --ema-decay 0.794 or less" in warning and 0.794**20 == pytest.approx(0.01, rel=0.02)
    assert study.ema_warning(StudyConfig(ema_decay=0.999, steps=5000)) is None
    assert study.ema_warning(StudyConfig(**TINY)) is None  # EMA 0: the raw weights are scored
    with pytest.raises(FileNotFoundError, match="does not exist"):  # the warning comes first, before any data is read
        study.run_study(StudyConfig(**{**TINY, "ema_decay": 0.999, "data_path": str(tmp_path / "missing")}, out=str(tmp_path / "s")))
    assert capsys.readouterr().err.strip() == f"warning: {study.ema_warning(StudyConfig(**{**TINY, 'ema_decay': 0.999}))}"
