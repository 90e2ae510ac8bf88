"""Text to video: moving-fashion-mnist-captions against the clips' velocities, the VideoMMDiT
(shapes, the prompt reaches the clip, save / load, flops), training (the loss falls, resume is
exact), sampling a GIF and an .npz from prompts, the direction metric, and bad input in one sentence."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_resume_exact, randomize_weights
from PIL import Image

from ditkit.checkpoints import load_model, save_pretrained
from ditkit.cli import main
from ditkit.config import TrainConfig, VideoMMDiTConfig
from ditkit.flops import measure, preset_config
from ditkit.models.mmdit import TextCondition, VideoMMDiT
from ditkit.models.video import VideoDiT
from ditkit.train import Trainer
from ditkit.video import moving_clips, trajectory
from ditkit.video.captions import (
    SEEN_PHRASINGS,
    MovingFashionCaptions,
    caption_vocabulary,
    direction_hits,
    motion_following,
    motion_prompts,
    parse_motion_prompt,
)
from ditkit.video.moving import clip_rng

TINY = dict(model="MMDiT-S/4x2", data_path="moving-fashion-mnist-captions", objective="flow", hidden_size=24, depth=2, num_heads=2,
            frames=8, num_workers=0, lr=1e-3, log_every=1, device="cpu", text_max_length=16)  # fmt: skip


def tiny_config(**kw) -> VideoMMDiTConfig:
    base = dict(input_size=16, in_channels=1, frames=8, depth=2, hidden_size=24, num_heads=2, context_dim=8, pooled_dim=8)
    return VideoMMDiTConfig.from_preset("MMDiT-S/4x2", **{**base, **kw})


def condition(n: int, seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(n, 5, 8, generator=g), torch.ones(n, 5, dtype=torch.bool), torch.randn(n, 8, generator=g))


# -- the captions -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioned():
    return MovingFashionCaptions(frames=8, split="test")


def test_captions_name_the_item_and_initial_direction_deterministically(captioned):
    again = MovingFashionCaptions(frames=8, split="test", seed=7)  # the run's seed moves flips, not captions
    for i in range(0, 2000, 50):
        text = captioned.caption_of(i)
        assert text == again.caption_of(i) and text in captioned.captions
        cls, (h, v) = parse_motion_prompt(text)
        vx, vy = trajectory(clip_rng(0, "test", i), 8)[1][0]
        assert cls == captioned.classes[i] and h == ("left" if vx < 0 else "right") and v == ("up" if vy < 0 else "down"), text
        mirrored = parse_motion_prompt(captioned.caption_of(i, flipped=True))[1]
        assert mirrored == ({"left": "right", "right": "left"}[h], v)
    x, y = captioned[3]
    assert x.shape == (1, 8, 32, 32) and captioned.captions[y] in (captioned.caption_of(3), captioned.caption_of(3, flipped=True))
    assert len(caption_vocabulary()) == 1 + 10 * 3 * 4 * len(SEEN_PHRASINGS) and caption_vocabulary()[0] == ""


def test_direction_metric_on_real_clips():
    clips, _ = moving_clips("test", range(200), frames=8)
    velocities = [trajectory(clip_rng(0, "test", i), 1)[1][0] for i in range(200)]
    truth = [("left" if vx < 0 else "right", "up" if vy < 0 else "down") for vx, vy in velocities]
    opposite = [({"left": "right", "right": "left"}[h], {"up": "down", "down": "up"}[v]) for h, v in truth]
    first, opposed = direction_hits(clips, truth, 2).mean(), direction_hits(clips, opposite, 2).mean()
    assert first > 0.8 and opposed < 0.05  # the first step follows the caption but where the item bounces in it
    assert direction_hits(clips, truth).mean() < direction_hits(clips, truth, 4).mean() < first  # bounces turn clips later
    prompts = np.array(motion_prompts(8) + motion_prompts(4, "unseen") + ["a coat"])
    preds = np.full((13, 8), 1)
    result = motion_following(np.repeat(clips[:1], 13, 0), prompts, preds)
    assert result["seen"]["prompts"] == 8 and result["unseen"]["prompts"] == 4 and result["unscored"]["prompts"] == 1
    assert result["seen"]["direction"]["first step"] == 0.25 and result["seen"]["class_accuracy"] == 0.5  # one of 4 directions; t-shirts, then trousers


# -- the network ------------------------------------------------------------------------------
def test_shapes_zero_start_and_the_prompt_reaches_the_clip():
    torch.manual_seed(0)
    model = VideoMMDiT(tiny_config())
    x, t = torch.randn(2, 1, 8, 16, 16), torch.rand(2)
    assert model.num_patches == 4 * 4 * 4 and model.pos_embed.shape == (1, 64, 24)
    assert torch.equal(model(x, t, condition(2)), torch.zeros(2, 1, 8, 16, 16))  # adaLN-Zero and the zero final layer
    randomize_weights(model)
    a, b = model(x, t, condition(2, 0)), model(x, t, condition(2, 1))
    assert a.shape == (2, 1, 8, 16, 16) and (a - b).abs().mean() > 1e-3 * a.abs().mean()
    # Frame 0 changes when only the last frame's input changes: the tokens attend across time.
    y = x.clone()
    y[:, :, -1] += 1
    assert not torch.allclose(model(y, t, condition(2))[:, :, 0], model(x, t, condition(2))[:, :, 0])
    with pytest.raises(ValueError, match="takes clips of shape"):
        model(torch.randn(1, 1, 4, 16, 16), t[:1], condition(1))


def test_save_load_round_trip_and_flops(tmp_path):
    model = randomize_weights(VideoMMDiT(tiny_config()))
    folder = save_pretrained(model, model.config, tmp_path / "m")
    loaded = load_model(folder)
    assert isinstance(loaded, VideoMMDiT) and loaded.config == model.config
    x, t = torch.randn(1, 1, 8, 16, 16), torch.rand(1)
    assert torch.equal(loaded(x, t, condition(1)), model(x, t, condition(1)))
    video, image = measure(preset_config("MMDiT-S/4x2")), measure(preset_config("MMDiT-S/4"))
    assert video.model == "MMDiT-S/4x2" and video.frames == 16 and video.tokens == 8 * image.tokens and video.gflops > 4 * image.gflops  # the text stream costs the same


# -- training and sampling --------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, text_encoder_dir):
    """A tiny text-to-video MMDiT trained 20 steps on moving-fashion-mnist-captions (8 frames): its run folder.
    No training grid: its 16 clips of 25 Heun steps would cost more than the training."""
    torch.manual_seed(0)
    cfg = TrainConfig(**TINY, text_encoder=str(text_encoder_dir), global_batch_size=8, max_steps=20, ckpt_every=20,
                      warmup_steps=2, results_dir=str(tmp_path_factory.mktemp("t2v")))  # fmt: skip
    return Trainer(cfg).run()


def test_a_few_steps_lower_the_loss(run):
    losses = [float(line.split(",")[2]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["frames"] == 8 and saved["tubelet"] == 2 and "text_encoder" in saved


def test_resume_is_exact(tmp_path, text_encoder_dir):
    assert_resume_exact(dict(TINY, text_encoder=str(text_encoder_dir), global_batch_size=4), tmp_path)


def test_sample_a_gif_and_an_npz_from_prompts(run, tmp_path, capsys):
    args = ["--ckpt", str(run / "model"), "--num-sampling-steps", "2", "--cfg-scale", "1.5"]
    assert main(["sample", *args, "--prompt", "a sneaker moving right and down", "--num-samples", "2", "--out", str(tmp_path / "one.gif")]) == 0
    with Image.open(tmp_path / "one.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (34 + 2, 2 * 34 + 2)
    assert main(["sample-npz", *args, "--prompt", "a bag moving left and up", "--prompt", "a coat going right and down", "--num-samples", "4",
                 "--out", str(tmp_path / "c.npz")]) == 0  # fmt: skip
    with np.load(tmp_path / "c.npz") as data:
        assert data["arr_0"].shape == (4, 8, 32, 32, 1) and list(data["prompts"][:2]) == ["a bag moving left and up", "a coat going right and down"]
    capsys.readouterr()
    assert main(["eval", "--samples", str(tmp_path / "c.npz"), "--metrics", "accuracy", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "prompt following" in out and "seen " in out and "unseen " in out and "real (4)" in out


def test_serve_answers_animated_gifs_to_prompts(run):
    from test_serve import post, serving

    from ditkit.config import SamplingOptions
    from ditkit.pipeline import load_pipeline

    pipe = load_pipeline(SamplingOptions(ckpt=str(run / "model"), device="cpu"))
    with serving(pipe) as client:
        response = post(client, {"prompts": ["a bag moving left and up"], "num_samples": 2, "seed": 5, "num_sampling_steps": 2})
    assert response.status_code == 200, response.text
    urls = response.json()["images"]
    assert len(urls) == 2 and all(u.startswith("data:image/gif;base64,") for u in urls)


def test_bad_input_ends_in_one_sentence(run, tmp_path, capsys):
    net = VideoDiT(input_size=16, in_channels=1, frames=8, depth=1, hidden_size=24, num_heads=2, num_classes=10, learn_sigma=False)
    video = save_pretrained(net, net.config, tmp_path / "v", extra={"objective": {"objective": "flow"}})
    cases = [
        (["sample", "--ckpt", str(video), "--prompt", "a bag moving left and up"], "this is a class-conditional model: it takes class ids"),
        (["sample", "--ckpt", str(run / "model"), "--num-sampling-steps", "2"], "this is a text-to-video model; pass --prompt TEXT"),
        (["train", "--model", "MMDiT-S/4x2", "--data-path", "moving-fashion-mnist", "--objective", "flow"], "moving-fashion-mnist has no captions"),
        (["train", "--model", "MMDiT-S/4x2", "--data-path", "moving-fashion-mnist-captions", "--objective", "flow", "--attention", "factorized"],
         "attends over the prompt and all spacetime tokens together"),
        (["flops", "--model", "MMDiT-S/4x2", "--attention", "factorized"], "a text-to-video model (MMDiT-*x*) attends jointly"),
        (["train", "--model", "VDiT-S/4x2", "--data-path", "moving-fashion-mnist-captions"], "use --model MMDiT-S/4x2 (or --data-path moving-fashion-mnist"),
        (["train", "--model", "MMDiT-S/4x2", "--data-path", "moving-fashion-mnist-captions"], "add --objective flow"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
