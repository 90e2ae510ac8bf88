"""`ditkit sample` end to end, offline: tiny checkpoints, a tiny real AutoencoderKL, bad input;
what --ckpt accepts, the settings it prints, and the order of its checks."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit
from ditkit.checkpoints import save_pretrained
from ditkit.cli import main
from ditkit.config import TrainConfig
from ditkit.pipeline import default_sampling, find_checkpoint
from ditkit.train import Trainer
from conftest import tiny_vae


@pytest.fixture
def pixel_ckpt(tmp_path):
    torch.manual_seed(0)
    model = ditkit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    return save_pretrained(model, model.config, tmp_path / "pixel")


def test_pixel_model_grid(pixel_ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["sample", "--ckpt", str(pixel_ckpt), "--num-sampling-steps", "3", "--out", str(out)]) == 0
    grid = np.array(Image.open(out / "grid.png"))
    assert grid.shape == (4 * 10 + 2, 3 * 10 + 2)  # 4 per class, one column per class, 2 px padding
    assert len(list(out.glob("0*.png"))) == 12


def test_config_file_and_flags(pixel_ckpt, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'ckpt = "{pixel_ckpt}"\nclasses = [2]\nnum_samples = 2\nsampler = "ddim"\nnum_sampling_steps = 2\n')
    assert main(["sample", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("0*.png"))) == 2


def test_latent_model_with_vae(tmp_path):
    vae_dir = tmp_path / "vae"
    tiny_vae(vae_dir)
    model = ditkit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    ckpt = tmp_path / "latent.pt"
    torch.save(model.state_dict(), ckpt)  # official format: a raw state dict
    out = tmp_path / "o"
    rc = main(["sample", "--ckpt", str(ckpt), "--vae", str(vae_dir), "--image-size", "16", "--classes", "1", "3",
               "--num-sampling-steps", "2", "--cfg-scale", "1.5", "--out", str(out)])  # fmt: skip
    assert rc == 0
    img = np.array(Image.open(out / "000000.png"))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "3"], "outside [0, 3)"),
        (["--num-sampling-steps", "0"], "must be positive"),
        (["--image-size", "12"], "use --image-size 8"),
        (["--model", "DiT-S/2"], "does not fit"),
    ],
)
def test_bad_input_one_sentence(pixel_ckpt, tmp_path, capsys, args, message):
    assert main(["sample", "--ckpt", str(pixel_ckpt), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)


def test_latent_model_without_vae_and_unreadable_ckpt(tmp_path, capsys):
    model = ditkit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert main(["sample", "--ckpt", str(tmp_path / "m.pt")]) == 2
    assert "pass --vae" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["sample", "--ckpt", str(tmp_path / "bad.pt")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_xl2_runs_on_cpu(tmp_path):
    """DiT-XL/2 at 256 px (random weights, official .pt layout) through a tiny 8x VAE: 1 step."""
    tiny_vae(tmp_path / "vae", levels=4)  # three halvings: 256 px <-> 32x32 latents, as sd-vae
    torch.manual_seed(0)
    model = ditkit.DiT.from_preset("DiT-XL/2", input_size=32, num_classes=1000)
    torch.save(model.state_dict(), tmp_path / "DiT-XL-2-256x256.pt")
    del model
    out = tmp_path / "o"
    rc = main(["sample", "--ckpt", str(tmp_path / "DiT-XL-2-256x256.pt"), "--model", "DiT-XL/2", "--vae", str(tmp_path / "vae"),
               "--image-size", "256", "--classes", "207", "--num-sampling-steps", "1", "--cfg-scale", "4", "--out", str(out)])  # fmt: skip
    assert rc == 0
    assert np.array(Image.open(out / "000000.png")).shape == (256, 256, 3)


# --- models written by training: fast sampling by default, and every way to name them ----------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder as `ditkit train` writes it: two checkpoints and the EMA model folder."""
    root = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0,
                      max_steps=2, ckpt_every=1, global_batch_size=8, results_dir=str(root / "results"))  # fmt: skip
    Trainer(cfg).run()
    return root / "results" / "000-DiT-S-2"


def grid_of(ckpt, out, *extra) -> np.ndarray:
    assert main(["sample", "--ckpt", str(ckpt), "--num-samples", "3", "--out", str(out), *extra]) == 0
    return np.array(Image.open(out / "grid.png"))


def test_trained_model_samples_fast_and_says_how(trained_run, tmp_path, capsys):
    recorded = json.loads((trained_run / "model" / "config.json").read_text())["sampling"]
    assert recorded == default_sampling(ditkit.GaussianDiffusion()).to_dict() == {"sampler": "dpm++2m", "num_sampling_steps": 10, "cfg_scale": 4.0}
    grid_of(trained_run, tmp_path / "a")
    out = capsys.readouterr().out
    assert f"sampling 3 images from {trained_run / 'model'} with dpm++2m, 10 steps, cfg 4, seed 0" in out
    grid_of(trained_run, tmp_path / "b", "--sampler", "ddim", "--num-sampling-steps", "3", "--cfg-scale", "1.5", "--eta", "0.5", "--seed", "7")
    assert "with ddim, 3 steps, cfg 1.5, eta 0.5, seed 7" in capsys.readouterr().out


def test_ckpt_takes_a_run_folder_model_folder_or_pt(trained_run, tmp_path):
    ckpts = trained_run / "checkpoints"
    assert find_checkpoint(str(trained_run)) == trained_run / "model"
    assert find_checkpoint(str(ckpts)) == ckpts / "0000002.pt"
    copy = tmp_path / "000-DiT-S-2"  # a run folder without its model/: the newest checkpoint
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("model"))
    assert find_checkpoint(str(copy)) == copy / "checkpoints" / "0000002.pt"
    # The model folder holds the EMA weights of the newest checkpoint, which records the same sampling.
    grids = [grid_of(ckpt, tmp_path / f"o{i}") for i, ckpt in enumerate((trained_run, trained_run / "model", ckpts / "0000002.pt", copy))]
    for grid in grids[1:]:
        np.testing.assert_array_equal(grid, grids[0])
    assert main(["sample-npz", "--ckpt", str(trained_run), "--num-samples", "2", "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as data:
        assert data["arr_0"].shape == (2, 8, 8, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors, model/ or checkpoints/"):
        find_checkpoint(str(tmp_path / "empty"))


# --- cheap checks first, one sentence each --------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub answers nothing


def error_of(capsys, *argv) -> str:
    assert main(["sample", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditkit sample: error: "), captured.err
    assert "Retrying" not in captured.out + captured.err
    return lines[0]


def test_checks_come_before_anything_is_loaded(tmp_path, capsys, offline):
    """Each bad argument below is reported as itself: had the VAE (a folder with its config.json
    but no weights) been loaded first, every case would end in 'cannot load the VAE weights'."""
    vae = tmp_path / "vae"
    tiny_vae(vae)  # factor 2
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    model = ditkit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = ["--ckpt", str(tmp_path / "m.pt")]
    assert f"checkpoint {tmp_path / 'missing.pt'} does not exist" in error_of(capsys, "--ckpt", str(tmp_path / "missing.pt"), "--vae", "ema")
    assert "VAE folder nowhere does not exist" in error_of(capsys, *ckpt, "--vae", "./nowhere")
    assert "VAE folder vae-dir does not exist" in error_of(capsys, *ckpt, "--vae", "vae-dir")
    assert "is a file; pass the AutoencoderKL folder" in error_of(capsys, *ckpt, "--vae", str(tmp_path / "m.pt"))
    assert "cannot reach the Hugging Face hub for VAE 'no-such-org/no-such-vae'" in error_of(capsys, *ckpt, "--vae", "no-such-org/no-such-vae")
    with_vae = [*ckpt, "--vae", str(vae)]
    assert "not divisible by the VAE's downsampling factor 2" in error_of(capsys, *with_vae, "--image-size", "15")
    assert "use --image-size 16" in error_of(capsys, *with_vae, "--image-size", "24")
    assert "not divisible by patch size 8" in error_of(capsys, *with_vae, "--model", "DiT-S/8", "--image-size", "20")
    assert "cfg_channels must lie in 1..4" in error_of(capsys, *with_vae, "--cfg-channels", "99")
    assert "cannot load the VAE weights" in error_of(capsys, *with_vae)  # the folder really has none


@pytest.mark.parametrize("command", ["sample", "sample-npz"])
@pytest.mark.parametrize("flag, value", [("--cfg-scale", "nan"), ("--cfg-scale", "inf"), ("--cfg-scale", "-inf"), ("--eta", "nan")])
def test_non_finite_sampling_settings_are_refused(capsys, command, flag, value):
    assert main([command, f"{flag}={value}"]) == 2
    assert f"{flag} must be a finite number" in capsys.readouterr().err


def test_cfg_channels_beyond_the_model(pixel_ckpt, capsys):
    assert "cfg_channels must lie in 1..1" in error_of(capsys, "--ckpt", str(pixel_ckpt), "--cfg-channels", "99")


# --- where the images go ----------------------------------------------------------------------


def test_out_names_the_grid_file(pixel_ckpt, tmp_path, capsys):
    base = ["sample", "--ckpt", str(pixel_ckpt), "--num-sampling-steps", "2"]
    assert main([*base, "--out", str(tmp_path / "a" / "grid.png")]) == 0
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["grid.png"]  # a file, and nothing beside it
    grid = np.array(Image.open(tmp_path / "a" / "grid.png"))
    assert grid.shape == (4 * 10 + 2, 3 * 10 + 2)
    assert main([*base, "--out", str(tmp_path / "b" / "g.jpg"), "--save-images"]) == 0
    written = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert written == ["g-000000.png", "g-000001.png", *(f"g-{i:06d}.png" for i in range(2, 12)), "g.jpg"]
    assert Image.open(tmp_path / "b" / "g.jpg").format == "JPEG"
    cell = np.array(Image.open(tmp_path / "b" / "g-000000.png"))
    np.testing.assert_array_equal(cell, grid[2:10, 2:10])  # same seed, same first sample
    assert main([*base, "--out", str(tmp_path / "c"), "--no-save-images"]) == 0
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["grid.png"]
    assert main([*base, "--out", str(tmp_path / "x.npz")]) == 2
    assert "for an .npz use ditkit sample-npz" in capsys.readouterr().err


def test_compiled_network_samples_what_the_plain_one_does(pixel_ckpt, tmp_path):
    """--compile runs the samplers through torch.compile(model): the same images, within the
    rounding of fused kernels (uint8 values one apart at most)."""
    runs = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"s{len(flag)}.npz"
        assert main(["sample-npz", "--ckpt", str(pixel_ckpt), "--num-samples", "6", "--sampler", "ddim", "--num-sampling-steps", "3",
                     "--cfg-scale", "2", "--out", str(out), "--device", "cpu", *flag]) == 0  # fmt: skip
        runs[len(flag)] = np.load(out)["arr_0"].astype(int)
    assert runs[0].std() > 10  # images, not a constant
    assert np.abs(runs[0] - runs[1]).max() <= 1


# --- autoguidance -------------------------------------------------------------------------------


def random_dit(folder, seed, hidden_size=16, num_classes=3, **extra):
    """A small DiT whose zero-initialised layers (adaLN-Zero, the final layer) are random too, so
    that its predictions depend on its weights."""
    torch.manual_seed(seed)
    model = ditkit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=hidden_size, depth=1, num_heads=2, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.3)
    return save_pretrained(model, model.config, folder, extra=extra or None)


def test_guide_ckpt_flag_and_the_guide_a_model_folder_records(tmp_path, capsys):
    """--guide-ckpt guides with another model in place of the null condition: guided by itself the
    model samples what it samples unguided (same noise: N rows, no null half); a folder may record
    its guide (relative to it), which --guide-ckpt none turns off; a guide of other data is refused."""
    model = random_dit(tmp_path / "model", 0, hidden_size=32)
    base = ["--num-sampling-steps", "3", "--sampler", "ddim", "--seed", "3"]
    unguided = grid_of(model, tmp_path / "u", *base, "--cfg-scale", "1")
    assert unguided.std() > 10
    selfguided = grid_of(model, tmp_path / "s", *base, "--cfg-scale", "3", "--guide-ckpt", str(model))
    assert f"cfg 3, autoguidance by {model}" in capsys.readouterr().out
    np.testing.assert_array_equal(selfguided, unguided)

    random_dit(model / "guide", 1)
    meta = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**meta, "sampling": {"sampler": "ddim", "num_sampling_steps": 3, "cfg_scale": 3.0, "guide": "guide"}}))
    recorded = grid_of(model, tmp_path / "r", "--seed", "3")
    assert f"autoguidance by {model / 'guide'}" in capsys.readouterr().out
    cfg = grid_of(model, tmp_path / "n", "--seed", "3", "--guide-ckpt", "none")
    assert "autoguidance" not in capsys.readouterr().out
    assert not np.array_equal(recorded, cfg) and not np.array_equal(recorded, unguided)

    random_dit(tmp_path / "other", 2, num_classes=4)
    assert "the guide has 4 classes but the model has 3" in error_of(capsys, "--ckpt", str(model), "--guide-ckpt", str(tmp_path / "other"))
    random_dit(tmp_path / "flow-guide", 2, objective={"objective": "flow"})
    assert "predicts something else than the model (objective 'flow' (the model's: 'gaussian'))" in error_of(
        capsys, "--ckpt", str(model), "--guide-ckpt", str(tmp_path / "flow-guide"))
