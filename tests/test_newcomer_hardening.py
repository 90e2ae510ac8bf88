"""The newcomer's path (issue 28, items 19-23): export with no format, sampling settings through a
diffusers round trip, what a run shows and warns, one message for a missing official checkpoint,
flags before files, and the small sentences."""

import json
import os
import warnings

import pytest
import torch
from conftest import free_port

from ditkit.checkpoints import load_model, read_any
from ditkit.cli import main
from ditkit.config import EvalConfig, ExportConfig, TrainConfig
from ditkit.export import run_export
from ditkit.train import Trainer

TINY = dict(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, data_path="digits", global_batch_size=8, log_every=1)


# -- 19, 20: export -----------------------------------------------------------------------------


def test_export_with_only_an_out_folder_writes_the_bundled_model(tmp_path, capsys):
    out = run_export(ExportConfig(out=str(tmp_path / "e")))
    assert (out / "model.safetensors").exists() and "flow model" in capsys.readouterr().out
    assert torch.equal(load_model(out).state_dict()["pos_embed"], load_model(read_any("bundled")).state_dict()["pos_embed"])
    assert main(["export"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "d"), "--format", "diffusers"]) == 2  # asked for: still one sentence
    assert "--format ditkit" in capsys.readouterr().err


def test_a_diffusers_round_trip_keeps_the_sampling_settings(tmp_path):
    recorded = read_any("fashion-mnist-diffusion").meta["sampling"]
    assert recorded["num_sampling_steps"] == 25  # the bundled diffusion model's: ddim, 25 steps, cfg 4
    run_export(ExportConfig(ckpt="fashion-mnist-diffusion", out=str(tmp_path / "d")))
    back = read_any(tmp_path / "d")
    assert back.meta["sampling"] == recorded and back.meta["objective"]["objective"] == "gaussian"
    run_export(ExportConfig(ckpt=str(tmp_path / "d"), format="ditkit", out=str(tmp_path / "k")))
    assert json.loads((tmp_path / "k" / "config.json").read_text())["sampling"] == recorded


def test_export_with_another_sampler_records_that_one(tmp_path):
    run_export(ExportConfig(ckpt="fashion-mnist-diffusion", out=str(tmp_path / "d"), sampler="unipc"))
    assert read_any(tmp_path / "d").meta["sampling"]["sampler"] == "unipc"


# -- 21: what a run shows and warns -------------------------------------------------------------


def test_the_end_of_run_grid_shows_its_progress(tmp_path, capsys, one_thread):
    Trainer(TrainConfig(**TINY, num_workers=0, max_steps=1, sample_every=1, results_dir=str(tmp_path))).run()
    said = capsys.readouterr()
    assert "sample grid" in said.out + said.err and "ddim, 50 steps" in said.out + said.err


def test_data_loader_workers_follow_the_cores(tmp_path, monkeypatch):
    from ditkit.train.builders import build_loader
    from ditkit.utils.devices import loader_workers as num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cfg = TrainConfig(**TINY, results_dir=str(tmp_path))
    assert cfg.num_workers is None and num_workers(cfg.num_workers) == 2
    trainer_like = type("D", (), {"rank": 0, "world": 1, "device": torch.device("cpu")})
    from ditkit.data import build_dataset

    loader, _ = build_loader(build_dataset("digits"), trainer_like, cfg, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.check_worker_number_rationality()
    assert loader.num_workers == 2 and num_workers(0) == 0 and num_workers(3) == 3


def test_bf16_qk_norm_is_silent_and_unchanged(one_thread):
    from ditkit.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=4, qk_norm=True, learn_sigma=False)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    q = model.blocks[0].attn.q_norm
    h = torch.randn(2, 2, 16, 16).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = torch.nn.functional.rms_norm(h, q.normalized_shape, q.weight, q.eps)  # torch's unfused path
    assert out.dtype == torch.bfloat16 and torch.equal(q(h), plain)


# -- 22: missing official checkpoints, flags before files ----------------------------------------

URL = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"


@pytest.mark.parametrize("command", ["sample", "sample-npz", "flops", "export", "serve"])
def test_a_missing_official_checkpoint_gives_one_message_with_its_url(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    extra = {"export": ["--out", "e"], "serve": ["--port", str(free_port())]}.get(command, [])
    assert main([command, "--ckpt", "DiT-XL-2-256x256.pt", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ditkit {command}: error: DiT-XL-2-256x256.pt does not exist: the official DiT-XL/2 256x256 checkpoint is downloaded once from {URL}; pass the path of the downloaded file."


def test_sample_checks_the_image_size_before_looking_for_the_vae(tmp_path, capsys):
    assert main(["sample", "--image-size", "250", "--vae", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "250" in err and "--image-size 32" in err and "missing" not in err


# -- 23: the smaller ones -----------------------------------------------------------------------


def test_sample_with_prompts_prints_them(tmp_path, capsys):
    assert main(["sample", "--prompt", "a dark ankle boot", "--prompt", "a small bag", "--num-samples", "2", "--num-sampling-steps", "1",
                 "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "'a dark ankle boot'" in out and "'a small bag'" in out


def test_metric_names_in_any_case():
    assert EvalConfig(samples="s.npz", ref="fashion-mnist", metrics=("fd-effnet", "Accuracy", "fid")).metrics == ("FD-EffNet", "accuracy", "FID")


def test_small_sentences(capsys):
    from ditkit.checkpoints import describe
    from ditkit.generate import _duration

    with pytest.raises(ValueError) as e:
        EvalConfig(samples="s.npz", metrics=5)
    assert "a list of a" not in str(e.value) and "must be a list of text values" in str(e.value)
    with pytest.raises(ValueError) as e:
        TrainConfig(default_cfg_interval=("x", "y"))
    assert "must be a list of numbers" in str(e.value)
    assert ", 1 channel," in describe(read_any("bundled").config) and "1 channels" not in describe(read_any("bundled").config)
    assert _duration(0.2) == "under a second" and _duration(0) == "under a second" and _duration(90) == "2 min"


def test_an_unknown_flag_gets_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: ditkit sample") and "unrecognized arguments: --bogus" in err


def test_readme_says_how_many_images_mnist_holds():
    from pathlib import Path

    from ditkit.data import build_dataset

    n = len(build_dataset("mnist"))
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"{n:,}" in readme and n == 4500
