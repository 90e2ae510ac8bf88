"""Text-to-image end to end, offline: `ditkit train` on captioned data, `ditkit sample --prompt`,
`sample-npz --prompts`, `ditkit eval`'s prompt following, and bad input, on tiny models with a
tiny real BERT encoder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit
from ditkit.checkpoints import save_pretrained
from ditkit.cli import main
from ditkit.eval import evaluate
from ditkit.models.mmdit import MMDiT
from test_evaluate import TinyNet

STEPS = ["--num-sampling-steps", "2"]
# The bundled text model on 16 images (its 1 500-sample figures: class 0.90-0.94, attribute 0.86-0.93; README)
BUNDLED_MIN_CLASS, BUNDLED_MIN_ATTRIBUTE = 0.75, 0.75


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory, text_encoder_dir):
    """A random 32x32 gray MMDiT folder recording the tiny encoder, as training writes it."""
    torch.manual_seed(0)
    model = MMDiT(input_size=32, patch_size=8, in_channels=1, hidden_size=16, depth=1, num_heads=2, context_dim=16, pooled_dim=16)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(std=0.1)  # a non-zero output
    extra = {"objective": ditkit.FlowMatching().config.to_dict(), "sampling": {"sampler": "euler", "num_sampling_steps": 3, "cfg_scale": 2.0},
             "text_encoder": {"name": str(text_encoder_dir), "max_length": 16}}  # fmt: skip
    return save_pretrained(model, model.config, tmp_path_factory.mktemp("t2i") / "model", extra=extra)


def test_sample_prompts_and_prompt_file(text_ckpt, tmp_path):
    out = tmp_path / "o"
    assert main(["sample", "--ckpt", str(text_ckpt), "--prompt", "a dark coat", "--prompt", "a light bag", *STEPS, "--out", str(out)]) == 0
    grid = np.array(Image.open(out / "grid.png"))
    assert grid.shape == (4 * 34 + 2, 2 * 34 + 2) and len(list(out.glob("0*.png"))) == 8  # 4 per prompt, a column each
    images = [np.array(Image.open(out / f"{i:06d}.png")) for i in range(4)]
    assert not np.array_equal(images[0], images[1])  # different prompts, different images
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dark coat\n\na small dress\n")
    out2 = tmp_path / "o2"
    assert main(["sample", "--ckpt", str(text_ckpt), "--prompts", str(prompts), "--num-samples", "2", *STEPS, "--out", str(out2)]) == 0
    # The same seed and prompt give the same first image whatever else is in the batch.
    assert np.array_equal(np.array(Image.open(out2 / "000000.png")), images[0])


def test_sample_npz_and_eval_prompt_following(text_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.npz"
    assert main(["sample-npz", "--ckpt", str(text_ckpt), "--prompts", "fashion-mnist-captions", "--num-samples", "12",
                 "--batch-size", "8", *STEPS, "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    with np.load(out) as data:
        assert data["arr_0"].shape == (12, 32, 32, 1) and "labels" not in data.files
        prompts = data["prompts"]
    assert prompts[:3].tolist() == ditkit.text.prompts.read_prompts("fashion-mnist-captions")[:3]
    tiny = TinyNet()
    tiny.dims = {"pool": 5}
    monkeypatch.setattr(evaluate, "EffNetFeatures", lambda device: tiny)
    capsys.readouterr()
    assert main(["eval", "--samples", str(out), "--ref", "fashion-mnist:200", "--cache-dir", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    following = result["prompt_following"]
    assert [following[g]["prompts"] for g in ("seen", "unseen", "held-out")] == [4, 4, 4]
    for g in ("seen", "unseen", "held-out"):
        assert 0 <= following[g]["class_accuracy"] <= 1 and 0 <= following[g]["attribute_accuracy"] <= 1
    assert main(["eval", "--samples", str(out), "--ref", "fashion-mnist:200", "--cache-dir", str(tmp_path)]) == 0
    assert "prompt following" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "prompt 1 is empty"),
        (["--prompt", "a coat", "--classes", "1"], "takes prompts (--prompt), not class ids"),
        ([], "pass --prompt TEXT"),
        (["--prompt", "a coat", "--text-encoder", "/no/such/encoder"], "text encoder folder /no/such/encoder does not exist"),
        (["--prompts", "missing.txt"], "prompts file missing.txt does not exist"),
        (["--prompt", "a coat", "--num-classes", "3"], "has no classes"),
    ],
)
def test_bad_input_one_sentence(text_ckpt, tmp_path, capsys, args, message):
    assert main(["sample", "--ckpt", str(text_ckpt), *STEPS, "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and "Traceback" not in err


def test_prompt_to_a_class_model_and_wrong_encoder_width(text_ckpt, tmp_path, capsys):
    dit = ditkit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    folder = save_pretrained(dit, dit.config, tmp_path / "dit")
    assert main(["sample", "--ckpt", str(folder), "--prompt", "a coat", *STEPS, "--out", str(tmp_path / "o")]) == 2
    assert "class-conditional model: it takes class ids" in capsys.readouterr().err
    from conftest import tiny_text_encoder

    wide = tiny_text_encoder(tmp_path / "wide", hidden=24)
    assert main(["sample", "--ckpt", str(text_ckpt), "--prompt", "a coat", "--text-encoder", str(wide), *STEPS, "--out", str(tmp_path / "o")]) == 2
    assert "gives 24-wide embeddings but the model takes 16" in capsys.readouterr().err


def test_train_on_captioned_folder_then_sample(tmp_path, text_encoder_dir, text_ckpt, capsys, monkeypatch):
    """`ditkit train --model MMDiT-...` on a folder with captions: the run records its encoder, the
    exported model samples with a prompt and nothing else, a resumed run continues bitwise, and
    --init-from continues the model in a new run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a dark square" if i < 4 else "a light square")
    common = ["train", "--model", "MMDiT-S/8", "--hidden-size", "16", "--depth", "1", "--num-heads", "2", "--objective", "flow",
              "--data-path", str(data), "--image-size", "16", "--text-encoder", str(text_encoder_dir), "--global-batch-size", "4",
              "--num-workers", "0", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu"]  # fmt: skip
    assert main([*common, "--max-steps", "4", "--results-dir", str(tmp_path / "straight")]) == 0
    assert main([*common, "--max-steps", "2", "--results-dir", str(tmp_path / "resumed")]) == 0
    assert main([*common, "--max-steps", "4", "--results-dir", str(tmp_path / "resumed"), "--resume", "latest"]) == 0
    a = torch.load(next((tmp_path / "straight").glob("*/checkpoints/0000004.pt")), weights_only=True)["model"]
    b = torch.load(next((tmp_path / "resumed").glob("*/checkpoints/0000004.pt")), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    model_dir = next((tmp_path / "straight").glob("*/model"))
    recorded = json.loads((model_dir / "config.json").read_text())
    assert recorded["text_encoder"]["name"] == str(text_encoder_dir) and recorded["context_dim"] == 16
    out = tmp_path / "o"
    assert main(["sample", "--ckpt", str(model_dir), "--prompt", "a light square", *STEPS, "--out", str(out)]) == 0
    assert np.array(Image.open(out / "000000.png")).shape == (16, 16, 3)
    # --init-from continues a text model with fresh optimizer state: its weights are the start.
    assert main([*common, "--max-steps", "1", "--results-dir", str(tmp_path / "more"), "--init-from", str(model_dir), "--lr", "1e-12"]) == 0
    c = torch.load(next((tmp_path / "more").glob("*/checkpoints/0000001.pt")), weights_only=True)["model"]
    start = ditkit.checkpoints.read_checkpoint(model_dir).state
    assert all(torch.allclose(c[k], start[k], rtol=0, atol=1e-9) for k in start)  # a tiny lr: still the base's weights
    capsys.readouterr()
    assert main([*common, "--max-steps", "1", "--results-dir", str(tmp_path / "more"), "--init-from", str(text_ckpt)]) == 2
    assert "takes 1-channel 32x32; pass --image-size and --channels to match it" in capsys.readouterr().err
    assert main(["train", "--model", "MMDiT-S/8", "--data-path", str(data), "--results-dir", str(tmp_path / "x")]) == 2
    assert "add --objective flow" in capsys.readouterr().err
    assert main(["train", "--model", "DiT-S/8", "--data-path", "fashion-mnist-captions", "--results-dir", str(tmp_path / "x")]) == 2
    assert "use --model MMDiT-S/8" in capsys.readouterr().err


def test_prompt_alone_samples_the_bundled_text_model(tmp_path, monkeypatch):
    """`ditkit sample --prompt ...` with no other argument: the shipped MMDiT and encoder, offline;
    the shipped classifier recognises the classes it draws and the pixels show the brightness asked."""
    from ditkit.text.captions import measure_attributes
    from ditkit.eval.classifier import classifier_predictions, load_classifier

    monkeypatch.chdir(tmp_path)
    prompts = ["a dark ankle boot", "a light pair of trousers", "a light bag", "a dark t-shirt"]
    assert main(["sample", *[a for p in prompts for a in ("--prompt", p)]]) == 0
    images = np.stack([np.array(Image.open(tmp_path / "samples" / f"{i:06d}.png")) for i in range(16)])[..., None]
    classes = np.array([9, 1, 8, 0] * 4)
    predicted = classifier_predictions(load_classifier()[0], images)
    brightness = measure_attributes(images, classes)["brightness"]
    assert (predicted == classes).mean() >= BUNDLED_MIN_CLASS and (brightness == np.array([0, 1, 1, 0] * 4)).mean() >= BUNDLED_MIN_ATTRIBUTE
