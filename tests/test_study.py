"""`ditkit study` end to end on 8x8 digits with a tiny flow recipe: the grids (size x patch, blocks,
DiT / U-ViT / U-Net at matched Gflops), seeds, results, table and plots, no retraining, resume,
timing; the sizing of the U-Net and the U-ViT by multiply-adds; the U-Net baseline's interface."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import ditkit.study.runner as runner
from ditkit.cli import main
from ditkit.config import DiTConfig, StudyConfig, UNetConfig, UViTConfig
from ditkit.flops import count_macs, measure
from ditkit.models.unet import UNetBaseline
from ditkit.study import data_info, size_unet, size_uvit

RECIPE = """data_path = "digits"
learn_sigma = false
objective = "flow"
global_batch_size = 8
lr = 1e-3
lr_schedule = "cosine"
ema_schedule = "power"
default_sampler = "heun"
default_steps = 2
default_cfg_scale = 2.0
default_cfg_interval = [0.1, 1.0]
"""
# Sizes x patches XS/8 and XS/4, one more block at XS/4, and the backbones at two levels: 7 runs of 4 steps.
TINY = dict(images=32, models=("XS/8", "XS/4"), blocks=("adaln_zero", "adaln"), block_model="XS/4", levels=("XS/8", "XS/4"), seeds=(0,),
            num_eval_samples=12, eval_batch_size=12, log_every=2, device="cpu")  # fmt: skip
RUNS = {"dit-XS-8-adaln_zero-s0", "dit-XS-4-adaln_zero-s0", "dit-XS-4-adaln-s0", "uvit-L1-s0", "uvit-L2-s0", "unet-L1-s0", "unet-L2-s0"}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on busy cores


class CountingTrainer(runner.Trainer):
    made: list = []

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        CountingTrainer.made.append((Path(cfg.results_dir).name, cfg.resume))


def read_rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def flags(settings: dict) -> list[str]:
    args = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        args += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    return args


def test_study_end_to_end_rerun_and_resume(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "study"
    monkeypatch.setattr(runner, "Trainer", CountingTrainer)
    CountingTrainer.made = []
    args = ["study", "--out", str(out), "--recipe", str(recipe), *flags(TINY)]
    assert main(args) == 0
    assert {name for name, _ in CountingTrainer.made} == RUNS  # the adaLN-Zero XS/4 serves three grids, trained once
    rows = read_rows(out)
    assert set(rows) == RUNS
    assert rows["dit-XS-4-adaln_zero-s0"]["grids"] == "sizes blocks backbones" and rows["dit-XS-4-adaln_zero-s0"]["level"] == "2"
    for r in rows.values():
        assert 0 < float(r["fd_effnet"]) < math.inf and r["accuracy"] == ""  # the classifier is for Fashion-MNIST only
        assert r["images"] == "32"
    # Every run trained the recipe for 4 steps with its seed, the paper's DiT blocks and t on [0, 1000].
    ck = torch.load(next((out / "runs" / "uvit-L2-s0").glob("*/checkpoints/0000004.pt")), weights_only=True)
    # A run's folder says what it trained, not the preset the study sized it from.
    assert [p.name for p in (out / "runs" / "unet-L1-s0").glob("000-*")] == [f"000-{rows['unet-L1-s0']['label'].replace(' ', '')}"]
    assert ck["args"]["time_scale"] == 1000.0 and ck["args"]["lr_schedule"] == "cosine" and ck["args"]["mlp"] == "gelu"
    assert ck["objective"]["objective"] == "flow" and UViTConfig(**ck["model_config"]).patch_size == 4
    info = data_info("digits")
    dit = measure(DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False))
    assert float(rows["dit-XS-4-adaln_zero-s0"]["gflops"]) == pytest.approx(dit.gflops) and int(rows["dit-XS-4-adaln_zero-s0"]["params"]) == dit.params
    assert rows["uvit-L2-s0"]["label"] == "U-ViT 32x2/4" and info.num_classes == 10  # the smallest: 8x8 digits need less than it costs
    table = (out / "table.md").read_text()
    for title in ("DiT model size x patch size", "The four conditioning blocks", "Backbones at matched Gflops"):
        assert f"### {title}" in table
    for name in ("fd_vs_gflops.png", "blocks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    saved = json.loads((out / "results.json").read_text())
    assert saved["recipe"]["objective"] == "flow" and "FD-EffNet" not in saved["columns"]["fd_effnet"][:0]

    # The same command again: nothing is trained, the results stay.
    CountingTrainer.made = []
    assert main(args) == 0
    assert CountingTrainer.made == [] and read_rows(out) == rows
    # A run killed before its score: scored again from its last checkpoint, not trained; the score is the same.
    (out / "runs" / "unet-L1-s0" / "done.json").unlink()
    assert main(args) == 0
    assert CountingTrainer.made == [] and read_rows(out)["unet-L1-s0"]["fd_effnet"] == rows["unet-L1-s0"]["fd_effnet"]
    # Its last checkpoint lost too: trained again (the run's data, noise and init are seeded), with the same score.
    run_dir = out / "runs" / "dit-XS-8-adaln_zero-s0"
    (run_dir / "done.json").unlink()
    next(run_dir.glob("*/checkpoints/0000004.pt")).unlink()
    assert main(args) == 0
    assert [name for name, _ in CountingTrainer.made] == ["dit-XS-8-adaln_zero-s0"]
    assert float(read_rows(out)["dit-XS-8-adaln_zero-s0"]["fd_effnet"]) == pytest.approx(float(rows["dit-XS-8-adaln_zero-s0"]["fd_effnet"]), rel=1e-5)

    # A study folder keeps its settings; which runs it holds (grids, seeds) may change.
    capsys.readouterr()
    assert main([*args, "--images", "64"]) == 2
    assert "images: 32 -> 64" in capsys.readouterr().err
    CountingTrainer.made = []
    assert main(["study", "--out", str(out), "--recipe", str(recipe), *flags({**TINY, "seeds": (0, 1)}), "--grids", "sizes"]) == 0
    assert sorted(name for name, _ in CountingTrainer.made) == ["dit-XS-4-adaln_zero-s1", "dit-XS-8-adaln_zero-s1"]
    assert "(" in (out / "table.md").read_text()  # two seeds: the mean and each seed's score

    # --time-runs measures each run's training steps alone and draws the wall-clock plot.
    assert main([*args, "--time-runs", "--grids", "sizes"]) == 0
    speed = json.loads((out / "runs" / "dit-XS-4-adaln_zero-s0" / "speed.json").read_text())
    assert speed["images_per_s"] > 0 and (out / "fd_vs_wallclock.png").exists()


def test_study_config_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="--models is 'M/2', not one of"):
        StudyConfig(models=("M/2",))
    with pytest.raises(ValueError, match="no runs"):
        StudyConfig(grids=("blocks",), blocks=())
    with pytest.raises(ValueError, match="--seeds is empty"):
        StudyConfig(seeds=())
    with pytest.raises(ValueError, match="--images 100 is not a multiple of the recipe's batch 32; use --images 96"):
        runner.Study(StudyConfig(images=100))
    with pytest.raises(ValueError, match="--family-lr 'vit=1e-2' is not FAMILY=LR with FAMILY one of dit, uvit, unet"):
        StudyConfig(family_lr=("vit=1e-2",))
    with pytest.raises(ValueError, match="--family-lr 'uvit=0' is not FAMILY=LR"):
        StudyConfig(family_lr=("uvit=0",))
    with pytest.raises(ValueError, match="--family-lr 'dit=inf' is not FAMILY=LR"):
        StudyConfig(family_lr=("dit=inf",))


def test_family_learning_rates_reach_their_runs(tmp_path):
    (tmp_path / "recipe.toml").write_text(RECIPE)
    cfg = StudyConfig(**{**TINY, "out": str(tmp_path / "study"), "recipe": str(tmp_path / "recipe.toml")}, family_lr=("uvit=1e-2", "UNet=3e-4"))
    runs = runner.Study(cfg).plan()
    lrs = {r.name: r.train.lr for r in runs}
    assert {lrs["uvit-L1-s0"], lrs["uvit-L2-s0"]} == {1e-2} and {lrs["unet-L1-s0"], lrs["unet-L2-s0"]} == {3e-4}
    assert lrs["dit-XS-4-adaln-s0"] == lrs["dit-XS-8-adaln_zero-s0"] == 1e-3  # no dit= given: the recipe's


def test_unet_baseline_interface():
    config = UNetConfig(input_size=8, in_channels=1, num_classes=10, base_channels=8)
    torch.manual_seed(0)
    model = UNetBaseline(config)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    y = torch.tensor([0, 9, config.null_class])  # the null label has its own embedding row
    assert model(x, t, y).shape == (3, 2, 8, 8)
    assert model.unet.class_embedding.num_embeddings == 11
    assert config.block_out_channels == (8, 16) and config.num_real_classes == 10
    assert UNetConfig(input_size=32, in_channels=1, num_classes=10, base_channels=64).block_out_channels == (64, 128, 128)


def test_unet_and_uvit_are_sized_to_a_target():
    like = DiTConfig.from_preset("DiT-S/2", input_size=16, in_channels=1, num_classes=10, learn_sigma=False, hidden_size=128, depth=6, num_heads=4)
    target = measure(like).macs
    unet = size_unet(target, like, max_channels=32)
    with torch.device("meta"):
        macs = count_macs(UNetBaseline(unet))
    assert (unet.input_size, unet.in_channels, unet.num_classes) == (16, 1, 10)
    assert 1 / 1.3 < macs / target < 1.3
    base = UViTConfig(img_size=16, patch_size=2, in_chans=1, num_classes=11)
    width, depth, heads = size_uvit(target, base, dit_depth=6)
    assert width % 32 == 0 and heads == width // 32 and depth in (2, 4, 6, 8)
    c = UViTConfig(img_size=16, patch_size=2, in_chans=1, num_classes=11, embed_dim=width, depth=depth, num_heads=heads)
    assert abs(math.log(measure(c).macs / target)) < 0.1
