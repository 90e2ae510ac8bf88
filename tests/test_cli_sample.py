"""`ditkit sample` end to end, offline: tiny checkpoints, a tiny real AutoencoderKL, bad input."""


import numpy as np
import pytest
import torch
from PIL import Image

import ditkit
from ditkit.checkpoints import save_pretrained
from ditkit.cli import main
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


def test_image_size_the_vae_cannot_take(tmp_path, capsys):
    tiny_vae(tmp_path / "vae")
    model = ditkit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert main(["sample", "--ckpt", str(tmp_path / "m.pt"), "--vae", str(tmp_path / "vae"), "--image-size", "15"]) == 2
    assert "not divisible by the VAE" in capsys.readouterr().err


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


def test_default_job_samples_the_bundled_model(tmp_path, monkeypatch):
    """`ditkit sample` with no arguments: the shipped model, every class, and the shipped
    classifier recognises most of what it draws (0.943 on 10 000 samples; README)."""
    from ditkit.eval.classifier import classifier_accuracy, load_classifier

    monkeypatch.chdir(tmp_path)
    assert main(["sample"]) == 0
    out = tmp_path / "samples"
    grid = np.array(Image.open(out / "grid.png"))
    assert grid.shape == (4 * 34 + 2, 10 * 34 + 2)  # 4 rows of the 10 classes at 32 px, 2 px padding
    images = np.stack([np.array(Image.open(out / f"{i:06d}.png")) for i in range(40)])[..., None]
    classifier, _ = load_classifier()
    assert classifier_accuracy(classifier, images, np.arange(40) % 10) >= 0.7
