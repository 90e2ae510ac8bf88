"""Video: the moving-fashion-mnist generator against its spec, the video DiT's attention groups and
3-D positions, training (the loss falls, resume is exact), sampling to GIF / MP4 / .npz, clip files
and folders, the clip metrics and FVD's loading path, and bad input in one sentence."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from safetensors.torch import save_file

from conftest import assert_resume_exact
from ditkit.cli import main
from ditkit.config import TrainConfig, VideoDiTConfig
import ditkit.eval.clips as clips_module
from ditkit.config import EvalConfig
from ditkit.eval.classifier import FashionClassifier
from ditkit.eval.clips import evaluate_clips
from ditkit.eval.npz import read_images
from ditkit.flops import measure
from ditkit.models.layers import apply_rope_axes, rope_3d
from ditkit.models.video import SpacetimeAttention, VideoDiT
from ditkit.train import Trainer
from ditkit.video import (
    ITEM,
    MovingFashionMNIST,
    VideoFolderDataset,
    has_av,
    moving_clips,
    read_frames,
    render,
    trajectory,
    write_gif,
    write_mp4,
)
from ditkit.video.metrics import I3DFeatures, clip_accuracy, load_i3d, majority, motion_stats, temporal_consistency

TINY = dict(model="VDiT-S/4x2", data_path="moving-fashion-mnist", objective="flow", learn_sigma=False, hidden_size=32, depth=2,
            num_heads=2, frames=8, attention="factorized", num_workers=0, lr=1e-3, log_every=1, device="cpu")  # fmt: skip


def tiny_config(preset: str = "VDiT-S/4x2", **kw) -> VideoDiTConfig:
    base = dict(input_size=16, in_channels=1, num_classes=10, frames=8, depth=2, hidden_size=48, num_heads=2)
    return VideoDiTConfig.from_preset(preset, **{**base, **kw})


# -- the data -------------------------------------------------------------------------------
def test_trajectory_bounces_at_the_edges_with_constant_speeds():
    for seed in range(200):
        pos, vel = trajectory(np.random.default_rng(seed), 16)
        assert pos.min() >= 0 and pos.max() <= 32 - ITEM
        speed = np.abs(vel)
        assert np.all((speed >= 1) & (speed <= 2)) and np.all(speed == speed[0])  # each component's speed never changes
        step = np.diff(pos, axis=0)
        straight = np.sign(vel[:-1]) == np.sign(vel[1:])
        assert np.allclose(step[straight], vel[:-1][straight])  # no bounce: the position moves by the velocity
        # A bounce reflects the component: the would-be position mirrored at the edge.
        for t, axis in zip(*np.nonzero(~straight)):
            would = pos[t, axis] + vel[t, axis]
            assert pos[t + 1, axis] == pytest.approx(-would if would < 0 else 2 * (32 - ITEM) - would)
    starts = np.array([trajectory(np.random.default_rng(s), 1)[0][0] for s in range(400)])
    assert starts.min() < 1 and starts.max() > 11  # uniform over [0, 12]


def test_clips_are_deterministic_per_index_and_drawn_as_specified():
    clips, labels = moving_clips("train", [3, 10, 3])
    assert clips.shape == (3, 16, 32, 32, 1) and clips.dtype == np.uint8
    assert np.array_equal(clips[0], clips[2]) and not np.array_equal(clips[0], clips[1])
    again, _ = moving_clips("train", [10])
    assert np.array_equal(again[0], clips[1])
    # Each frame is the item alone on black, at the rounded position.
    pos, _ = trajectory(np.random.default_rng([0, 0, 10]), 16)
    x, y = np.rint(pos[5]).astype(int)
    frame = clips[1, 5, ..., 0]
    assert frame[y : y + ITEM, x : x + ITEM].sum() == frame.sum() > 0
    ds = MovingFashionMNIST(frames=8, flip=False)
    item, label = ds[10]
    assert item.shape == (1, 8, 32, 32) and label == labels[1]
    assert torch.equal(item, torch.from_numpy(clips[1, :8, ..., 0]).float().div(255).sub(0.5).div(0.5)[None])
    flipped = MovingFashionMNIST(frames=8, flip=True, seed=0)
    assert any(torch.equal(flipped[i][0], ds[i][0].flip(-1)) and not torch.equal(flipped[i][0], ds[i][0]) for i in range(8))
    with pytest.raises(ValueError, match="8 to 16 frames, not 4; pass --frames in that range"):
        MovingFashionMNIST(frames=4)


def test_motion_statistics_of_real_clips_match_the_spec():
    clips, labels = moving_clips("test", range(60))
    stats = motion_stats(clips)
    assert 1.5 < stats["speed"] < 2.9  # |v| between sqrt(2) and sqrt(8), plus what rounding and bounces add
    assert stats["vanished"] == 0
    still = np.repeat(clips[:, :1], 16, axis=1)
    assert motion_stats(still)["speed"] == pytest.approx(0) and motion_stats(still)["speed change"] == pytest.approx(0)
    split = clips.copy()
    split[:, :, :, 16:] = 0  # cut every item down the middle of the canvas ...
    split[:, :, :, 16:] = np.roll(clips, 6, axis=3)[:, :, :, 16:]
    assert motion_stats(split)["split"] > stats["split"]
    preds = np.array([[1, 1, 2, 1], [3, 4, 4, 4]])
    assert majority(preds).tolist() == [1, 4]
    assert clip_accuracy(preds, np.array([1, 3])) == 0.5 and temporal_consistency(preds) == 0.75


def test_clip_files_and_folders(tmp_path):
    clips, _ = moving_clips("train", range(3), frames=8)
    write_gif(clips[0], tmp_path / "a.gif")
    back = np.stack([np.array(f.convert("L")) for f in read_frames(tmp_path / "a.gif")])
    assert np.array_equal(back, clips[0, ..., 0])
    root = tmp_path / "clips"
    write_gif(clips[0], root / "coat" / "one.gif")
    (root / "coat" / "two").mkdir(parents=True)
    for t, frame in enumerate(clips[1, ..., 0]):
        Image.fromarray(frame).save(root / "coat" / "two" / f"{t:02d}.png")
    kinds = 3 if has_av() else 2
    if has_av():
        write_mp4(clips[2], root / "dress" / "three.mp4")
        assert len(read_frames(root / "dress" / "three.mp4")) == 8
    else:
        write_gif(clips[2], root / "dress" / "three.gif")
    ds = VideoFolderDataset(root, frames=8, channels=1, flip=False)
    assert ds.class_names == ("coat", "dress") and len(ds) == kinds and ds.labels.tolist() == [0, 0, 1]
    x, y = ds[1]
    assert x.shape == (1, 8, 32, 32) and y == 0
    assert torch.equal(x[0], torch.from_numpy(clips[1, ..., 0]).float().div(255).sub(0.5).div(0.5))
    with pytest.raises(ValueError, match="fewer than the 12 a sample takes"):
        VideoFolderDataset(root, frames=12, on_bad_image="stop")[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no clips"):
        VideoFolderDataset(tmp_path / "empty")


# -- the network ----------------------------------------------------------------------------
def test_video_dit_shapes_and_zero_start():
    for attention, preset in (("joint", "VDiT-S/4x1"), ("factorized", "VDiT-S/4x2"), ("windowed", "VDiT-S/4x2")):
        c = tiny_config(preset, attention=attention, window=2, pos_embed="sincos+rope", learn_sigma=True)
        model = VideoDiT(c)
        x = torch.randn(2, 1, 8, 16, 16)
        out = model(x, torch.rand(2), torch.tensor([3, 10]))  # 10: the null label
        assert out.shape == (2, 2, 8, 16, 16) and torch.count_nonzero(out) == 0  # adaLN-Zero and a zero final layer
        torch.nn.init.normal_(model.final_layer.linear.weight)
        assert model(x, torch.rand(2), torch.tensor([3, 1])).abs().sum() > 0
    with pytest.raises(ValueError, match=r"takes clips of shape \(1, 8, 16, 16\)"):
        model(torch.randn(1, 1, 4, 16, 16), torch.rand(1), torch.tensor([0]))


@pytest.mark.parametrize("mode", ["joint", "spatial", "temporal", "window", "shifted"])
def test_attention_stays_within_its_groups(mode):
    """A change to one token reaches exactly the tokens of its group: the frame, the position
    across frames, the (shifted, wrapping) window of 4 token frames, or everything."""
    torch.manual_seed(0)
    frames, side = 8, 2
    attn = SpacetimeAttention(16, 2, (frames, side, side), mode, window=4)
    x = torch.randn(1, frames * 4, 16)
    token = 1 * 4 + 2  # frame 1, position 2
    y = x.clone()
    y[0, token] += 1
    changed = (attn(y) - attn(x)).abs().sum(-1)[0] > 1e-6  # (L,)
    f, p = torch.arange(frames).repeat_interleave(4), torch.arange(4).repeat(frames)
    expected = {
        "joint": torch.ones(frames * 4, dtype=torch.bool),
        "spatial": f == 1,
        "temporal": p == 2,
        "window": f < 4,
        "shifted": f < 2,  # frames 6, 7 and 0, 1 share the wrapped window, but its halves stay apart
    }[mode]
    assert torch.equal(changed, expected)


def test_3d_rope_turns_by_the_relative_position():
    grid = (4, 3, 3)
    cos, sin = rope_3d(grid, 32)
    q, k = torch.randn(32), torch.randn(32)
    rot = lambda v, i: apply_rope_axes(v.expand(1, 1, 36, 32), cos, sin)[0, 0, i]  # noqa: E731
    index = lambda t, r, c: (t * 3 + r) * 3 + c  # noqa: E731
    # The same offset (1, 1, -1) from two places gives the same score; another offset another.
    a = rot(q, index(0, 0, 1)) @ rot(k, index(1, 1, 0))
    b = rot(q, index(2, 1, 2)) @ rot(k, index(3, 2, 1))
    other = rot(q, index(2, 1, 2)) @ rot(k, index(3, 2, 2))
    assert a == pytest.approx(b.item(), rel=1e-5) and abs(a - other) > 1e-3


def test_flops_count_video_presets_and_factorized_is_cheaper():
    costs = {a: measure(tiny_config("VDiT-S/4x1", attention=a, frames=32, input_size=32, hidden_size=64, window=4)) for a in ("joint", "factorized", "windowed")}
    assert costs["joint"].tokens == 32 * 64 and costs["joint"].frames == 32
    assert costs["joint"].macs > 2 * costs["factorized"].macs and costs["joint"].macs > costs["windowed"].macs > costs["factorized"].macs
    assert main(["flops", "--json", "--model", "VDiT-S/4x2", "--in-channels", "1", "--image-size", "32", "--frames", "8", "--attention", "joint", "factorized"]) == 0


# -- training, sampling, evaluation --------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny video DiT trained 24 steps on moving-fashion-mnist (8 frames): its run folder."""
    root = tmp_path_factory.mktemp("video")
    torch.manual_seed(0)
    return Trainer(TrainConfig(**TINY, global_batch_size=8, max_steps=24, ckpt_every=24, sample_every=24, warmup_steps=2, results_dir=str(root))).run()


def test_a_few_steps_lower_the_loss(run):
    losses = [float(line.split(",")[2]) for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 24 and np.mean(losses[-6:]) < 0.8 * np.mean(losses[:3])
    assert json.loads((run / "model" / "config.json").read_text())["frames"] == 8
    with Image.open(run / "samples" / "0000024.gif") as grid:  # the training grid is animated: every class, 8 frames
        assert grid.n_frames == 8 and grid.size == (10 * 34 + 2, 34 + 2)


def test_resume_is_exact(tmp_path):
    assert_resume_exact(dict(TINY, global_batch_size=4), tmp_path)


def test_sample_writes_animated_grids_and_sample_npz_writes_clips(run, tmp_path):
    args = ["--ckpt", str(run / "model"), "--num-sampling-steps", "2", "--cfg-scale", "1.5"]
    assert main(["sample", *args, "--num-samples", "3", "--out", str(tmp_path / "s")]) == 0
    with Image.open(tmp_path / "s" / "grid.gif") as grid:
        assert grid.n_frames == 8 and grid.size == (10 * 34 + 2, 34 + 2)  # a column per class
    assert len(list((tmp_path / "s" / "grid-frames").glob("*.png"))) == 8 and (tmp_path / "s" / "000002.gif").exists()
    assert (tmp_path / "s" / "grid.mp4").exists() == has_av()
    assert main(["sample", *args, "--num-samples", "2", "--out", str(tmp_path / "clips.gif")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips.gif", "s"]
    assert main(["sample", *args, "--out", str(tmp_path / "clips.png")]) == 2
    assert main(["sample-npz", *args, "--num-samples", "5", "--batch-size", "3", "--out", str(tmp_path / "c.npz")]) == 0
    with np.load(tmp_path / "c.npz") as data:
        assert data["arr_0"].shape == (5, 8, 32, 32, 1) and data["arr_0"].dtype == np.uint8 and data["labels"].shape == (5,)


def test_serve_answers_animated_gifs(run):
    import base64
    import io

    from test_serve import direct, post, serving

    from ditkit.config import SamplingOptions
    from ditkit.pipeline import load_pipeline

    pipe = load_pipeline(SamplingOptions(ckpt=str(run / "model"), device="cpu"))
    with serving(pipe) as client:
        response = post(client, {"classes": [3], "num_samples": 2, "seed": 5, "num_sampling_steps": 2})
    assert response.status_code == 200, response.text
    urls = response.json()["images"]
    assert len(urls) == 2 and all(u.startswith("data:image/gif;base64,") for u in urls)
    with Image.open(io.BytesIO(base64.b64decode(urls[1].split(",", 1)[1]))) as gif:
        frames = [np.array(frame.convert("L")) for frame in ImageSequence.Iterator(gif)]
    alone = direct(pipe, [3, 3], 5, steps=2)  # (2, T, H, W, 1): what ditkit sample draws with that seed
    np.testing.assert_array_equal(np.stack(frames), alone[1, ..., 0])


def test_eval_of_clips_and_fvd_through_torchscript(tmp_path, capsys, monkeypatch):
    clips, labels = moving_clips("test", range(40), frames=8)
    np.savez(tmp_path / "real.npz", arr_0=clips, labels=labels)
    noisy = np.clip(clips.astype(int) + np.random.default_rng(0).integers(-60, 60, clips.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "noisy.npz", arr_0=noisy, labels=labels)

    class TinyI3D(torch.nn.Module):  # the call of StyleGAN-V's i3d_torchscript.pt, 8-d features
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 4 * 4, 8)

        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = True) -> torch.Tensor:
            pooled = torch.nn.functional.adaptive_avg_pool3d(x, (1, 4, 4)).flatten(1)  # (N, 48)
            return self.proj(pooled)

    torch.manual_seed(0)
    torch.jit.script(TinyI3D()).save(str(tmp_path / "i3d.pt"))
    detector = load_i3d(tmp_path / "i3d.pt")
    feats = I3DFeatures(detector, dim=8)(clips[:2])["logits"]
    assert feats.shape == (2, 8)
    cfg = EvalConfig(samples=str(tmp_path / "noisy.npz"), ref=str(tmp_path / "real.npz"), metrics=("motion", "FVD"), i3d=str(tmp_path / "i3d.pt"),
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    real = read_images(tmp_path / "real.npz")
    with pytest.raises(ValueError, match="FVD needs more than 400 clips on each side"):  # the real I3D's 400-d logits
        evaluate_clips(cfg, real)
    original = clips_module.I3DFeatures
    monkeypatch.setattr(clips_module, "I3DFeatures", lambda detector, device: original(detector, device, dim=8))
    same = evaluate_clips(cfg, real)
    noisy_result = evaluate_clips(cfg, read_images(tmp_path / "noisy.npz"))
    assert same["metrics"]["FVD"] == pytest.approx(0, abs=1e-6) and noisy_result["metrics"]["FVD"] > 1e-3
    assert same["metrics"]["speed"] == pytest.approx(same["reference"]["speed"])
    assert noisy_result["metrics"]["speed"] != pytest.approx(same["reference"]["speed"], rel=0.05)
    (tmp_path / "bad.pt").write_bytes(b"not a network")
    with pytest.raises(ValueError, match="is not a TorchScript I3D"):
        load_i3d(tmp_path / "bad.pt")
    # The command line: without the classifier of moving items (a checkout that lacks the shipped
    # file) accuracy and consistency end in one sentence; with one (untrained here) they run.
    missing = tmp_path / "fmnist_video_classifier.safetensors"
    monkeypatch.setattr(clips_module, "VIDEO_CLASSIFIER_PATH", missing)
    assert main(["eval", "--samples", str(tmp_path / "real.npz"), "--metrics", "accuracy", "consistency"]) == 2
    err = capsys.readouterr().err
    assert "train it with python scripts/train_fmnist_classifier.py --data moving-fashion-mnist" in err and err.count("\n") == 1, err
    save_file(FashionClassifier().state_dict(), str(missing))
    assert main(["eval", "--samples", str(tmp_path / "real.npz"), "--metrics", "accuracy", "consistency"]) == 0
    out = capsys.readouterr().out
    assert "40 clips" in out and "consistency" in out
    assert main(["eval", "--samples", str(tmp_path / "real.npz"), "--ref", str(tmp_path / "real.npz"), "--metrics", "FID"]) == 2
    assert "FID is an image metric; for clips ditkit reports" in capsys.readouterr().err


def test_shipped_models_of_moving_items(tmp_path, capsys):
    """The shipped classifier of moving items judges real clips well (0.88 per clip at 500), and the
    bundled video model draws clips that it and the motion statistics recognise."""
    clips, labels = moving_clips("test", range(48), frames=16)
    np.savez(tmp_path / "real.npz", arr_0=clips, labels=labels)
    assert main(["eval", "--samples", str(tmp_path / "real.npz"), "--metrics", "accuracy", "consistency", "--json"]) == 0
    out = capsys.readouterr().out
    real = json.loads(out[out.index("{"):])["metrics"]
    assert real["accuracy"] >= 0.75 and real["consistency"] >= 0.85, real
    assert main(["sample-npz", "--ckpt", "fashion-mnist-video", "--num-samples", "20", "--out", str(tmp_path / "clips.npz")]) == 0
    capsys.readouterr()
    assert main(["eval", "--samples", str(tmp_path / "clips.npz"), "--ref", str(tmp_path / "real.npz"), "--metrics", "accuracy", "motion", "--json"]) == 0
    out = capsys.readouterr().out
    made = json.loads(out[out.index("{"):])
    assert made["metrics"]["accuracy"] >= 0.7, made  # 0.944 at 500 clips
    assert made["metrics"]["speed"] == pytest.approx(made["reference"]["speed"], rel=0.25) and made["metrics"]["vanished"] < 0.05, made


# -- bad input ------------------------------------------------------------------------------
def test_bad_input_ends_in_one_sentence(tmp_path, capsys):
    cases = [
        (["train", "--model", "VDiT-S/4x2", "--data-path", "fashion-mnist"], "is a video model and fashion-mnist holds images"),
        (["train", "--model", "DiT-S/4", "--data-path", "moving-fashion-mnist"], "are for video models; pick a VDiT-* --model"),
        (["train", "--model", "VDiT-S/4x2", "--data-path", "moving-fashion-mnist", "--attention", "windowed", "--window", "3", "--max-steps", "1",
          "--results-dir", str(tmp_path)], "windowed attention needs an even window"),
        (["eval", "--samples", "fashion-mnist-test:10", "--ref", "fashion-mnist-test:10", "--metrics", "motion"], "motion is measured on clips"),
        (["flops", "--model", "DiT-S/4", "--frames", "8"], "--frames and --attention shape video models"),
        (["train", "--model", "VDiT-S/4x2", "--data-path", "moving-fashion-mnist", "--objective", "meanflow"], "which trains with --objective flow or gaussian"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
