"""The README as a newcomer follows it: every command of its bash blocks and its Python blocks
run here as written, offline. Each command has one entry in CHECKS saying how the suite checks
it; a README command without an entry (or an entry the README lost) fails the first test."""

import contextlib
import io
import json
import os
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import ditkit
from ditkit.cli import _config_class, main, make_parser, parse_config
from ditkit.config import DistillConfig, DPOConfig, ServeConfig, TrainConfig
from ditkit.eval.classifier import VIDEO_CLASSIFIER_PATH, classifier_accuracy, classifier_predictions, load_classifier
from ditkit.text.prompts import read_prompts
from ditkit.train import Trainer
from conftest import tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on busy cores
README = Path(__file__).parent.parent / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def readme_blocks(lang: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(README.read_text()) if m.group(1) == lang]


WORDS: dict[str, list[str]] = {}  # each command's words as the shell splits them (a quoted prompt stays one word)


def readme_commands() -> list[str]:
    """Every command of the bash blocks, in order: comments dropped, `a && b` split."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # a trailing backslash continues the line
            words = shlex.split(line, comments=True)
            while words:
                head, words = (words[: words.index("&&")], words[words.index("&&") + 1 :]) if "&&" in words else (words, [])
                commands.append(" ".join(head))
                WORDS[commands[-1]] = head
    return commands


readme_commands()  # fills WORDS


# -- what each command must do ---------------------------------------------------------------


def grid_images(path: Path, n: int, size: int = 32, ncol: int = 10) -> np.ndarray:
    """The first n cells of a save_grid PNG (2 px padding) as (n, size, size, 1)."""
    grid = np.array(Image.open(path))
    cells = [grid[2 + r * (size + 2) : 2 + r * (size + 2) + size, 2 + c * (size + 2) : 2 + c * (size + 2) + size]
             for r, c in (divmod(i, ncol) for i in range(n))]  # fmt: skip
    return np.stack(cells)[..., None]


def bundled_grid(out: str, err: str) -> None:
    """The default job: every class of the bundled model, 4 rows, and the shipped classifier
    recognises most of what it draws (0.96 on 10 000 samples; README)."""
    assert "from " in out and "dpm++2m-flow, 10 steps, cfg 2 on t in [0.3, 1]" in out  # the settings it used
    grid = np.array(Image.open("samples/grid.png"))
    assert grid.shape == (4 * 34 + 2, 10 * 34 + 2)
    images = np.stack([np.array(Image.open(f"samples/{i:06d}.png")) for i in range(40)])[..., None]
    np.testing.assert_array_equal(grid_images(Path("samples/grid.png"), 40), images)
    assert classifier_accuracy(load_classifier()[0], images, np.arange(40) % 10) >= 0.7


def turbo_grid(out: str, err: str) -> None:
    """The shipped 1-step student: every class, 4 rows, in one network evaluation (0.96 on 2 000 samples; README)."""
    assert "euler, 1 steps" in out or "euler, 1 step" in out, out
    grid = np.array(Image.open("turbo.png"))
    assert grid.shape == (4 * 34 + 2, 10 * 34 + 2)
    assert classifier_accuracy(load_classifier()[0], grid_images(Path("turbo.png"), 40), np.arange(40) % 10) >= 0.7


def one_png(out: str, err: str) -> None:
    grid = np.array(Image.open("shirts.png"))
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2)  # classes 0 and 6, two rows
    assert not list(Path().glob("shirts-*.png")) and not Path("shirts.png").is_dir()
    labels = np.array([0, 6, 0, 6])
    assert classifier_accuracy(load_classifier()[0], grid_images(Path("shirts.png"), 4, ncol=2), labels) >= 0.75


def trained_model_fast(out: str, err: str) -> None:
    assert f"from {Path('results/000-DiT-S-4/model')} with dpm++2m, 10 steps, cfg 4" in out
    assert np.array(Image.open("samples/grid.png")).shape == (4 * 10 + 2, 10 * 10 + 2)  # 8x8 digits, 4 per class


def npz_samples(out: str, err: str) -> None:
    with np.load("samples.npz") as data:
        assert data["arr_0"].shape == (10, 32, 32, 1) and data["labels"].shape == (10,)


def eval_default(out: str, err: str) -> None:
    assert re.search(r"accuracy\s+(0\.[789]\d*|1\.0+)\s", out), out
    assert "skipped FD-EffNet needs at least 1281 samples" in out and "got 10" in out


def eval_accuracy(out: str, err: str) -> None:
    assert out.splitlines()[0] == "10 samples (samples.npz)"
    assert float(out.splitlines()[1].split()[1]) >= 0.7 and len(out.splitlines()) == 2


def text_samples(out: str, err: str) -> None:
    """Two prompts to the bundled text-to-image model, offline: 4 images each, alternating; the
    shipped classifier sees the classes asked for (ankle boot 9, sneaker 7)."""
    images = np.stack([np.array(Image.open(Path("samples") / f"{i:06d}.png")) for i in range(8)])[..., None]
    assert (classifier_predictions(load_classifier()[0], images) == np.array([9, 7] * 4)).mean() >= 0.75


def prompt_npz(out: str, err: str) -> None:
    with np.load("p.npz") as data:
        assert data["arr_0"].shape == (20, 32, 32, 1) and data["prompts"].shape == (20,) and "labels" not in data.files
        assert list(data["prompts"][:3]) == read_prompts("fashion-mnist-captions")[:3]


def eval_prompts(out: str, err: str) -> None:
    assert "seen" in out and "held-out" in out and "skipped FD-EffNet needs at least 1281 samples" in out, out


def video_grid(out: str, err: str) -> None:
    """The bundled video model: every class, 4 rows, 16 frames, animated, the items moving."""
    with Image.open("clips.gif") as gif:
        grid = np.stack([np.array(frame.convert("L")) for frame in ImageSequence.Iterator(gif)])  # (T, H, W)
    assert grid.shape == (16, 4 * 34 + 2, 10 * 34 + 2)
    assert grid[:, 2:34, 2:34].std(axis=0).mean() > 0  # the frames differ


def video_npz(out: str, err: str) -> None:
    with np.load("clips.npz") as data:
        assert data["arr_0"].shape == (4, 16, 32, 32, 1) and data["labels"].shape == (4,)


def eval_clips(out: str, err: str) -> None:
    assert out.splitlines()[0].startswith("4 clips (clips.npz) vs 2000 reference clips"), out
    assert "speed" in out and "(reference " in out, out
    assert VIDEO_CLASSIFIER_PATH.is_file() and re.search(r"consistency\s+(0\.\d+|1\.0+)\s", out), out  # the shipped classifier
    assert "skipped FD-EffNet needs more than 1280 frames" in out, out


def flops_video(out: str, err: str) -> None:
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[2] for r in rows] == ["joint", "factorized", "windowed"] and all(r[3] == "32x32x32x1" for r in rows), out
    joint, factorized, windowed = (float(r[-2]) for r in rows)
    assert joint > 1.5 * factorized and joint > windowed > factorized  # 82.2, 44.4, 48.4 G multiply-adds per clip


def flops_mmdit(out: str, err: str) -> None:
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[:2] for r in rows] == [["MMDiT-S/2", "joint"], ["MMDiT-B/2", "joint"]], out


def flops_table(out: str, err: str) -> None:
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == list(ditkit.PRESETS)
    for r in rows:  # Gflops and the paper's figure printed alike, and within 0.6%
        assert re.fullmatch(r"\d+\.\d\d", r[-2]) and re.fullmatch(r"\d+\.\d\d", r[-1]), r
        assert abs(float(r[-2]) / float(r[-1]) - 1) < 6e-3 or abs(float(r[-2]) - float(r[-1])) <= 0.005


def flops_blocks(out: str, err: str) -> None:
    rows = json.loads(out)
    assert [r["block"] for r in rows] == ["in_context", "cross_attn", "adaln", "adaln_zero"]
    for r in rows:
        assert r["gflops"] == pytest.approx(r["paper_gflops"], rel=5e-3)


def flops_uvit(out: str, err: str) -> None:
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[:2] for r in rows] == [[name, "long-skips"] for name in ("U-ViT-S/2", "U-ViT-M/4", "U-ViT-L/2", "U-ViT-H/2")], out
    # Parameters (M) at 256 px with 1 001 classes: H/2 and L/2 are the released ImageNet 256 models (Table 1: 287M, 501M).
    assert [r[8] for r in rows] == ["44.77", "130.82", "286.76", "500.83"]


def flops_bundled(out: str, err: str) -> None:
    row = out.splitlines()[1].split()
    assert row[:8] == ["custom", "adaln_zero", "32x32x1", "4", "6", "128", "4", "64"] and row[8] == "1.88"


# How the suite checks each README command:
#   ("run", check)           as written, then check(stdout, stderr)
#   ("scaled", extra, check) as written plus flags that only shrink the job (the last flag wins)
#   ("fails", words)         needs files that cannot exist offline: one sentence with these words, at once
#   ("parsed", [Config])     a training longer than the suite, or a server: its flags and values build the config
#   ("not run", why)         installs, downloads, the suite itself
CHECKS = {
    "pip install torch==2.13.0": ("not run", "installs"),
    "pip install -e .": ("not run", "installs"),
    "ditkit sample": ("run", bundled_grid),
    "apt-get install -y dataset-fashion-mnist chromium": ("not run", "installs"),
    "pip install -e .[test]": ("not run", "installs"),
    "python -m pytest -q": ("not run", "the suite itself"),
    "ditkit sample --classes 0 6 --num-samples 4 --out shirts.png": ("run", one_png),
    "ditkit sample --ckpt results/000-DiT-S-4": ("run", trained_model_fast),
    "ditkit sample --ckpt DiT-XL-2-256x256.pt --vae ema --image-size 256 --classes 207 360 --cfg-scale 4":
        ("fails", "DiT-XL-2-256x256.pt does not exist: the official DiT-XL/2 256x256 checkpoint is downloaded once from https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"),
    "ditkit train --config fmnist-bundled": ("parsed",),
    "ditkit train --config fmnist-cpu": ("parsed",),
    "ditkit train --config fmnist-fast": ("parsed",),
    "ditkit train --config fmnist-5min": ("parsed",),
    "ditkit train --data-path fashion-mnist --model DiT-S/4 --objective flow --t-sampling logit-normal --cos-loss 0.1 --mlp swiglu "
    "--norm rmsnorm --qk-norm --pos-embed sincos+rope --lr 1e-3 --lr-schedule cosine --ema-schedule power --max-minutes 30": ("parsed",),
    "ditkit train --data-path fashion-mnist --model DiT-S/2 --max-steps 1000": ("parsed",),
    "ditkit train --data-path ./my_images --model DiT-B/4 --image-size 64": ("parsed",),
    "ditkit extract --data-path ./imagenet/train --vae ema --image-size 256 --out latents/":
        ("fails", "data path ./imagenet/train does not exist"),
    "torchrun --nproc_per_node 8 -m ditkit train --data-path latents/ --model DiT-XL/2 --precision bf16 --compile": ("parsed",),
    "ditkit train --resume latest": ("parsed",),
    "ditkit sample-npz --num-samples 10000 --out samples.npz": ("scaled", ["--num-samples", "10"], npz_samples),
    "ditkit eval --samples samples.npz --ref fashion-mnist": ("run", eval_default),
    "ditkit eval --samples samples.npz --metrics accuracy": ("run", eval_accuracy),
    "ditkit eval --samples samples.npz --ref VIRTUAL_imagenet256.npz --inception pt_inception-2015-12-05-6726825d.pth":
        ("fails", "reference file VIRTUAL_imagenet256.npz does not exist"),
    "ditkit flops": ("run", flops_table),
    "ditkit flops --block in-context cross-attention adaLN adaLN-Zero --model DiT-XL/2 --json": ("run", flops_blocks),
    "ditkit flops --ckpt bundled": ("run", flops_bundled),
    "ditkit train --config fmnist-cpu --max-steps 1500": ("parsed",),
    "ditkit train --config fmnist-cpu --resume latest --max-steps 6300 --precision bf16 --compile": ("parsed",),
    "python scripts/bundle_model.py results/000-DiT-S-4/checkpoints/0006300.pt": ("not run", "needs the bundled model's 6 300-step checkpoint"),
    "python scripts/bundle_model.py results/000-DiT-S-4/checkpoints/0005500.pt --sampler heun --steps 4 --cfg-scale 2.5 --cfg-interval 0.1 1 "
    "--out ditkit/assets/fashion-mnist-v1": ("not run", "needs the first bundled model's 5 500-step checkpoint"),
    "ditkit train --config fmnist-bundled-v1": ("parsed",),
    "ditkit ema --run results/000-DiT-S-4 --length 0.05": ("fails", "--ema-profiles"),  # no such run, or one without EMA snapshots: both say to train with --ema-profiles
    "python scripts/bundle_model.py results/000-DiT-S-4/ema-0.050 --sampler dpm++2m-flow --steps 10 --cfg-scale 2 --cfg-interval 0.3 1":
        ("not run", "needs the bundled model's 52 000-step run"),
    "ditkit train --config fmnist-bundled --init-from fashion-mnist-v2 --lr 1e-3 --warmup-steps 1000 --max-steps 40000 --max-minutes 100": ("parsed",),
    "ditkit ema --run results/001-finetune --length 0.03": ("fails", "--ema-profiles"),
    "python scripts/bundle_model.py results/001-finetune/ema-0.030 --sampler dpm++2m-flow --steps 10 --cfg-scale 2 --cfg-interval 0.3 1":
        ("not run", "needs the bundled model's second run"),
    "ditkit distill --teacher fashion-mnist-v1 --method guidance --max-steps 2000 --lr 2e-4 --precision auto": ("parsed", DistillConfig),
    "ditkit distill --teacher fashion-mnist-v1 --method progressive --start-steps 4 --student-steps 1 --max-steps 1800 --lr 2e-4 --precision auto": ("parsed", DistillConfig),
    "ditkit distill --teacher fashion-mnist-v1 --method reflow --reflow-pairs 2048 --student-steps 2 --max-steps 600 --lr 2e-4 --precision auto": ("parsed", DistillConfig),
    "ditkit sample --ckpt fashion-mnist-turbo --out turbo.png": ("run", turbo_grid),
    "ditkit distill --resume latest": ("parsed", DistillConfig),
    "ditkit distill --teacher fashion-mnist-v1 --method ladd --student-steps 1 --student-init fashion-mnist-turbo --max-steps 500 --lr 3e-5 "
    "--disc-lr 1e-4 --disc-warmup 100 --adv-t-mean -1.5 --precision auto": ("parsed", DistillConfig),
    "ditkit train --data-path fashion-mnist --model DiT-S/4 --hidden-size 128 --depth 6 --num-heads 4 --no-learn-sigma --objective meanflow "
    "--t-sampling logit-normal --t-mean -0.4 --mf-share 0.25 --mf-kappa 0.5 --mlp swiglu --norm rmsnorm --qk-norm --pos-embed sincos+rope "
    "--global-batch-size 32 --lr 1e-3 --warmup-steps 100 --lr-schedule cosine --min-lr 1e-5 --adam-beta2 0.95 --grad-clip 1.0 --ema-schedule power "
    "--precision bf16 --compile --max-steps 4000 --max-minutes 70 --ckpt-every 1000 --log-every 50 --num-workers 0": ("parsed",),
    "pip install -e .[lora]": ("not run", "installs"),
    "ditkit train --init-from bundled --data-path mnist --lora-rank 8 --lora-alpha 16 --max-steps 2000 --lr 1e-3 --ema-schedule power": ("parsed",),
    "ditkit sample --lora results/000-lora/adapter --classes 3 7": ("fails", "LoRA adapter results/000-lora/adapter does not exist"),
    "ditkit export --format ditkit --lora results/000-lora/adapter --out merged-model": ("fails", "LoRA adapter results/000-lora/adapter does not exist"),
    "ditkit dpo --out dpo": ("parsed", DPOConfig),
    "pip install -e .[text]": ("not run", "installs"),
    "ditkit sample --prompt a dark ankle boot --prompt a light sneaker": ("run", text_samples),
    "ditkit sample --ckpt results/001-MMDiT-S-4/model --prompts prompts.txt": ("fails", "checkpoint results/001-MMDiT-S-4/model does not exist"),
    "ditkit train --config fmnist-text-cpu": ("parsed",),
    "ditkit train --config fmnist-text-bundled": ("parsed",),
    "ditkit train --model MMDiT-B/2 --objective flow --t-sampling logit-normal --time-scale 1000 --data-path ./captioned "
    "--text-encoder ./t5-v1_1-base --vae ema --image-size 256": ("parsed",),
    "ditkit sample-npz --prompts fashion-mnist-captions --num-samples 1500 --out p.npz": ("scaled", ["--num-samples", "20"], prompt_npz),
    "ditkit eval --samples p.npz --ref fashion-mnist": ("run", eval_prompts),
    "ditkit flops --model MMDiT-S/2 MMDiT-B/2": ("run", flops_mmdit),
    "ditkit train --data-path fashion-mnist --model U-ViT-S/4 --depth 6 --hidden-size 128 --num-heads 4 --objective flow --max-steps 1000": ("parsed",),
    "ditkit sample --ckpt imagenet256_uvit_huge.pth --vae ema --classes 207 360": ("fails", "imagenet256_uvit_huge.pth does not exist: the official U-ViT ImageNet 256 U-ViT-H/2 is downloaded once"),
    "ditkit flops --model U-ViT-S/2 U-ViT-M/4 U-ViT-L/2 U-ViT-H/2": ("run", flops_uvit),
    "pip install -e .[video]": ("not run", "installs"),
    "ditkit train --config fmnist-video": ("parsed",),
    "ditkit train --data-path ./my_clips --model VDiT-B/4x2 --objective flow --frames 16 --attention factorized": ("parsed",),
    "ditkit sample --ckpt fashion-mnist-video --out clips.gif": ("run", video_grid),
    "ditkit sample-npz --ckpt fashion-mnist-video --num-samples 500 --out clips.npz": ("scaled", ["--num-samples", "4"], video_npz),
    "python scripts/train_fmnist_classifier.py --data moving-fashion-mnist": ("not run", "an hour of training; the shipped classifier is what it writes"),
    "ditkit eval --samples clips.npz --ref moving-fashion-mnist-test:2000": ("run", eval_clips),
    "ditkit flops --model VDiT-S/4x1 --in-channels 1 --image-size 32 --frames 32 --attention joint factorized windowed": ("run", flops_video),
    "pip install -e .[serve]": ("not run", "installs"),
    "ditkit serve": ("parsed", ServeConfig),
    "ditkit serve --ckpt DiT-XL-2-256x256.pt --vae ema --max-batch-size 32": ("parsed", ServeConfig),
    "ditkit serve --ckpt fashion-mnist-text": ("parsed", ServeConfig),
    "curl -s 127.0.0.1:7860/api/generate -H Content-Type: application/json -d {\"classes\": [3], \"num_samples\": 4, \"seed\": 7}":
        ("not run", "needs a running server: tests/test_serve.py starts one and posts such requests"),
    "ditkit export --ckpt DiT-XL-2-256x256.pt --vae ema --out dit-xl-2-256/": ("fails", "DiT-XL-2-256x256.pt does not exist: the official DiT-XL/2 256x256 checkpoint is downloaded once from https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"),
    "ditkit export --format ditkit --ckpt facebook/DiT-XL-2-256 --out dit-xl/": ("fails", "facebook/DiT-XL-2-256 is not a local path"),
}  # fmt: skip
NEEDS = {  # made by an earlier command
    "ditkit eval --samples samples.npz": "ditkit sample-npz --num-samples 10000 --out samples.npz",
    "ditkit eval --samples p.npz": "ditkit sample-npz --prompts fashion-mnist-captions --num-samples 1500 --out p.npz",
    "ditkit eval --samples clips.npz": "ditkit sample-npz --ckpt fashion-mnist-video --num-samples 500 --out clips.npz",
}


def ditkit_argv(command: str) -> list[str]:
    words = WORDS.get(command) or shlex.split(command)
    start = 1 if words[0] == "ditkit" else words.index("ditkit") + 1  # `torchrun ... -m ditkit ...`
    return words[start:]


@contextlib.contextmanager
def cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class Workspace:
    """One folder where the README's commands run in order, each at most once."""

    def __init__(self, root: Path):
        self.root, self.done = root, set()

    def run(self, command: str, extra: tuple[str, ...] = ()) -> tuple[int, str, str, float]:
        out, err = io.StringIO(), io.StringIO()
        with cwd(self.root), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            start = time.perf_counter()
            rc = main([*ditkit_argv(command), *extra])
        return rc, out.getvalue(), err.getvalue(), time.perf_counter() - start

    def check(self, command: str) -> None:
        if command in self.done:
            return
        for prefix, needed in NEEDS.items():
            if command.startswith(prefix):
                self.check(needed)
        how = CHECKS[command]
        if how[0] in ("run", "scaled"):
            extra, check = (how[1], how[2]) if how[0] == "scaled" else ((), how[1])
            rc, out, err, _ = self.run(command, tuple(extra))
            assert rc == 0, err
            with cwd(self.root):
                check(out, err)
        elif how[0] == "fails":
            rc, out, err, seconds = self.run(command)
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("ditkit "), err
            assert how[1] in lines[0] and "Retrying" not in out + err
            assert seconds < 5  # file checks come before anything is loaded
        elif how[0] == "parsed":
            args = make_parser().parse_args(ditkit_argv(command))
            with cwd(self.root):
                assert isinstance(parse_config(_config_class(args.command), args), how[1] if len(how) > 1 else TrainConfig)
        self.done.add(command)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with what the README's reader would have made by then: trained runs (tiny
    stand-in for results/000-DiT-S-4 of `ditkit train --config fmnist-cpu`)."""
    root = tmp_path_factory.mktemp("readme")
    with cwd(root):
        Trainer(TrainConfig(model="DiT-S/4", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0,
                            max_steps=1, global_batch_size=8)).run()  # fmt: skip
        (root / "results" / "001-MMDiT-S-4").mkdir()  # the text run's index, left empty (its README command fails on the missing model)
    assert (root / "results" / "000-DiT-S-4" / "model" / "config.json").exists()
    return Workspace(root)


@pytest.fixture(autouse=True, scope="module")
def offline_cache(tmp_path_factory):
    """Dataset and statistics caches in a fresh folder; the hub answers nothing (as offline)."""
    import huggingface_hub.constants

    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield
    mp.undo()


def test_every_command_is_checked():
    commands = readme_commands()
    assert sorted(set(commands)) == sorted(CHECKS)
    assert {c for c in commands if c.startswith(("ditkit", "torchrun"))} <= {c for c, how in CHECKS.items() if how[0] != "not run"}


@pytest.mark.parametrize("command", [c for c, how in CHECKS.items() if how[0] != "not run"])
def test_command(workspace, command):
    workspace.check(command)


def test_python_blocks(tmp_path, monkeypatch):
    """The README's Python, in order in one namespace: the bundled model samples and saves a grid
    offline; the official example fails in one sentence without the released checkpoint, and runs
    as written with stand-ins of the same format (a small latent DiT as a raw state dict, a tiny
    AutoencoderKL folder with the SD-VAE's 8x downsampling)."""
    bundled, flow, official, _text = readme_blocks("python")
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)
    exec(compile(bundled, "README.md", "exec"), namespace)
    x = namespace["x"]
    assert x.shape == (10, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(grid_images(tmp_path / "classes.png", 10), namespace["to_uint8"](x))
    assert classifier_accuracy(load_classifier()[0], namespace["to_uint8"](x), np.arange(10)) >= 0.7

    torch.manual_seed(0)
    exec(compile(flow, "README.md", "exec"), namespace)  # the flow example: SiT's linear interpolant, as written
    data, noise, t = namespace["data"], namespace["noise"], namespace["t"].view(-1, 1, 1, 1)
    torch.testing.assert_close(namespace["xt"], t * data + (1 - t) * noise)
    torch.testing.assert_close(namespace["ut"], data - noise)
    assert namespace["terms"]["loss"].shape == (8,) and namespace["z"].shape == (8, 1, 32, 32) and namespace["z"].isfinite().all()

    with pytest.raises(FileNotFoundError, match=r"^DiT-XL-2-256x256.pt does not exist: the official DiT-XL/2 256x256 checkpoint is downloaded once from https://dl.fbaipublicfiles"):
        exec(compile(official, "README.md", "exec"), dict(namespace))

    torch.manual_seed(0)
    stand_in = ditkit.DiT(input_size=32, patch_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=1000)
    torch.save(stand_in.state_dict(), tmp_path / "DiT-XL-2-256x256.pt")  # the official layout: a raw state dict
    with pytest.raises(ValueError, match=r"^VAE folder sd-vae-ft-ema does not exist"):
        exec(compile(official, "README.md", "exec"), dict(namespace))
    tiny_vae(tmp_path / "sd-vae-ft-ema", levels=4)
    exec(compile(official, "README.md", "exec"), namespace)
    assert namespace["latents"].shape == (2, 4, 32, 32) and namespace["images"].shape == (2, 3, 256, 256)
    assert np.array(Image.open(tmp_path / "official.png")).shape == (2 + 256 + 2, 2 * 258 + 2, 3)



def test_text_python_block(tmp_path, monkeypatch):
    """The README's text-to-image Python: the bundled MMDiT with the offline encoder, as written."""
    text = readme_blocks("python")[3]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(text, "README.md", "exec"), namespace)
    x = namespace["x"]
    assert isinstance(namespace["model"], ditkit.MMDiT) and x.shape == (2, 1, 32, 32) and x.isfinite().all()
