"""Training on the CPU: overfitting, bitwise resume, DDP parity, compile and checkpointing parity;
run folders, resume rules, checkpoint writes (kills, full disks, stale temporaries, fsync), the
log after a resume, config errors, NaN stop."""

import csv
import errno
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, tiny_vae
from PIL import Image

import ditkit
from ditkit.checkpoints import load_model
from ditkit.utils import io as checkpoints
from ditkit.utils.io import atomic_write, read_pt
from ditkit.cli import main
from ditkit.config import TrainConfig
from ditkit.train import Trainer
from ditkit.utils.runs import latest_checkpoint

TINY = dict(model="DiT-S/2", depth=2, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, log_every=2)
TINY_FLAGS = ["--data-path", "digits", "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
              "--global-batch-size", "16", "--num-workers", "0"]  # fmt: skip


def cfg(tmp_path, **kw):
    return TrainConfig(**{**TINY, "results_dir": str(tmp_path / "results"), **kw})


def final_state(exp_dir):
    return read_pt(latest_checkpoint(exp_dir.parent))


def assert_same(a, b, path="state"):
    """Nested dicts / lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def logged(exp_dir, column="step"):
    with open(exp_dir / "log.csv", newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = ditkit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    diffusion = ditkit.GaussianDiffusion()
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    y, t, noise = torch.arange(16) % 10, torch.randint(0, 1000, (16,)), torch.randn(16, 1, 8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        loss = diffusion.training_losses(model.train(), x0, t, noise=noise, y=y)["mse"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_resume_is_bitwise(tmp_path):
    """8 steps straight equal 4 steps, then a bare resume (only --max-steps given: every other
    setting comes from the checkpoint) to 8: weights, EMA and AdamW state, bit for bit."""
    # 1618 digits / batch 512 = 3 steps per epoch: 8 steps cross two epoch ends, resume lands mid-epoch.
    common = dict(global_batch_size=512, ckpt_every=4, log_every=1)
    straight = Trainer(cfg(tmp_path / "a", max_steps=8, **common)).run()
    first = Trainer(cfg(tmp_path / "b", max_steps=4, **common)).run()
    resumed = Trainer(TrainConfig(results_dir=str(tmp_path / "b" / "results"), resume="latest", max_steps=8)).run()
    assert resumed == first
    a, b = final_state(straight), final_state(resumed)
    assert b["step"] == 8 and b["args"]["global_batch_size"] == 512 and b["args"]["max_steps"] == 8
    for key in ("model", "ema", "opt"):
        assert_same(a[key], b[key], key)
    assert len(b["opt"]["state"]) == len(b["model"]) - 1  # AdamW moments of every parameter but the fixed pos_embed
    assert not torch.equal(a["model"]["final_layer.linear.weight"], torch.zeros_like(a["model"]["final_layer.linear.weight"]))
    assert logged(resumed) == list(range(1, 9))


def _ddp_worker(rank, world, port, kwargs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    Trainer(TrainConfig(**kwargs)).run()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_gloo_equals_one_process(tmp_path, parallel):
    kw = dict(TINY, global_batch_size=32, max_steps=3, ckpt_every=3)
    one = Trainer(TrainConfig(**kw, results_dir=str(tmp_path / "one"))).run()
    kw.update(parallel=parallel, sample_every=3)  # under FSDP every rank joins the grid's forwards
    mp.spawn(_ddp_worker, args=(2, free_port(), dict(kw, results_dir=str(tmp_path / "two"))), nprocs=2, join=True)
    two = latest_checkpoint(tmp_path / "two").parent.parent
    assert (two / "samples" / "0000003.png").exists()
    a, b = final_state(one), final_state(two)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], rtol=1e-5, atol=1e-6), k


def test_grad_checkpointing_matches_plain(tmp_path):
    a = Trainer(cfg(tmp_path / "a", global_batch_size=16, max_steps=3, ckpt_every=3)).run()
    b = Trainer(cfg(tmp_path / "b", global_batch_size=16, max_steps=3, ckpt_every=3, grad_checkpointing=True)).run()
    m1, m2 = final_state(a)["model"], final_state(b)["model"]
    for k in m1:
        assert torch.allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7), k


def test_compile_matches_plain(tmp_path):
    plain = Trainer(cfg(tmp_path / "a", global_batch_size=16, max_steps=2, ckpt_every=2, log_every=1)).run()
    compiled = Trainer(cfg(tmp_path / "b", global_batch_size=16, max_steps=2, ckpt_every=2, log_every=1, compile=True)).run()
    np.testing.assert_allclose(logged(plain, "loss"), logged(compiled, "loss"), rtol=1e-4)
    m1, m2 = final_state(plain)["model"], final_state(compiled)["model"]
    for k in m1:
        assert torch.allclose(m1[k], m2[k], rtol=1e-4, atol=1e-6), k


# -- run folders and resume rules -----------------------------------------------------------------


def test_new_run_never_takes_an_existing_folder(tmp_path, monkeypatch):
    """Numbered past the highest index (001 was deleted), and made exclusively: a folder that a
    run started at the same instant made first is left to it."""
    results = tmp_path / "results"
    for name in ("000-DiT-S-2", "002-DiT-S-2"):
        (results / name).mkdir(parents=True)
        (results / name / "log.csv").write_text("theirs")
    real_mkdir = Path.mkdir

    def racing_mkdir(self, *args, **kwargs):
        if self.parent == results and self.name == "003-DiT-S-2" and not self.exists():
            real_mkdir(self)  # the other run wins the race for 003
            (self / "log.csv").write_text("rival")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    exp = Trainer(cfg(tmp_path, global_batch_size=16, max_steps=1)).run()
    assert exp == results / "004-DiT-S-2" and (exp / "checkpoints" / "0000001.pt").exists()
    for name, text in (("000-DiT-S-2", "theirs"), ("002-DiT-S-2", "theirs"), ("003-DiT-S-2", "rival")):
        assert sorted(p.name for p in (results / name).iterdir()) == ["log.csv"] and (results / name / "log.csv").read_text() == text


def test_resume_from_a_file_outside_its_run_starts_a_new_run(tmp_path, capsys):
    """A checkpoint copied into a folder of the user's is never written beside: the run goes on in a new folder."""
    exp = Trainer(cfg(tmp_path, global_batch_size=16, max_steps=2, ckpt_every=2)).run()
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "log.csv").write_text("my own log\n")
    (mine / "downloads").mkdir()
    ck = mine / "downloads" / "0000002.pt"
    ck.write_bytes((exp / "checkpoints" / "0000002.pt").read_bytes())
    new = Trainer(cfg(tmp_path, global_batch_size=16, ckpt_every=2, resume=str(ck), max_steps=4)).run()
    assert new == exp.parent / "001-DiT-S-2" and "not in a ditkit run folder" in capsys.readouterr().out
    assert (mine / "log.csv").read_text() == "my own log\n" and list((mine / "model").iterdir()) == []
    assert read_pt(new / "checkpoints" / "0000004.pt")["step"] == 4 and logged(new) == [4]
    # A run folder as --resume continues that run, in place.
    again = Trainer(TrainConfig(results_dir=str(tmp_path / "elsewhere"), resume=str(exp), max_steps=3)).run()
    assert again == exp and read_pt(exp / "checkpoints" / "0000003.pt")["step"] == 3
    assert not (tmp_path / "elsewhere").exists()


def test_resume_refuses_another_batch_size_or_dataset(tmp_path):
    exp = Trainer(cfg(tmp_path, global_batch_size=16, max_steps=1)).run()
    with pytest.raises(ValueError, match=r"--global-batch-size 8 \(the run's: 16\); drop those flags") as e:
        Trainer(cfg(tmp_path, global_batch_size=8, resume="latest", max_steps=2))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"--data-path mnist \(the run's: digits\)"):
        Trainer(cfg(tmp_path, global_batch_size=16, data_path="mnist", resume="latest", max_steps=2))
    # The same path with other contents: the saved position would point at other images.
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "a").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "a" / f"{i}.png")
    folder = cfg(tmp_path / "f", data_path=str(tmp_path / "images"), image_size=8, global_batch_size=4, max_steps=1)
    Trainer(folder).run()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "a" / "8.png")
    with pytest.raises(ValueError, match=r"now holds 9 items, not the 8 .* restore the data, or start a new run"):
        Trainer(replace(folder, resume="latest", max_steps=2))
    assert exp.exists()


def test_cli_train_exports_ema_that_sample_loads_and_resumes_bare(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["train", *TINY_FLAGS, "--max-steps", "2", "--results-dir", str(results), "--sample-every", "2"]) == 0
    exp = results / "000-DiT-S-2"
    out = capsys.readouterr().out
    for written in (exp / "checkpoints" / "0000002.pt", exp / "model", exp / "samples" / "0000002.png"):
        assert str(written) in out  # the closing message says where everything is
    assert (exp / "log.csv").read_text().count("\n") == 2
    model = load_model(exp / "model")
    assert model.config.depth == 1 and model.config.num_classes == 10
    assert main(["sample", "--ckpt", str(exp / "model"), "--num-sampling-steps", "2", "--out", str(tmp_path / "s")]) == 0
    # --resume RUN_DIR alone continues with the run's own flags.
    assert main(["train", "--resume", str(exp), "--max-steps", "3"]) == 0
    ck = read_pt(exp / "checkpoints" / "0000003.pt")
    assert ck["step"] == 3 and ck["args"]["depth"] == 1 and ck["args"]["sample_every"] == 2
    capsys.readouterr()
    assert main(["train", "--resume", str(exp), "--max-steps", "4", "--hidden-size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--hidden-size 64 (the run's: 32)" in err and len(err.splitlines()) == 1


# -- checkpoint writes ----------------------------------------------------------------------------


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    trainer = Trainer(cfg(tmp_path, global_batch_size=16, max_steps=4, ckpt_every=2))
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half a file, then die
            f.write(b"\x80\x02partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    folder = trainer.exp_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["0000002.pt"]  # no partial file left behind
    assert read_pt(folder / "0000002.pt")["step"] == 2


def test_stale_temporaries_are_removed_when_a_run_resumes(tmp_path):
    """What kill -9 leaves mid-write (the finally of atomic_write never ran) goes at the next start."""
    exp = Trainer(cfg(tmp_path, global_batch_size=16, max_steps=1)).run()
    stale = [exp / "checkpoints" / ".0000002.pt.k3j5x9q1.tmp", exp / "model" / ".model.safetensors.a8d7f6e5.tmp",
             exp / ".log.csv.zz11yy22.tmp", exp / "samples" / ".0000002.png.q1w2e3r4.tmp"]  # fmt: skip
    (exp / "samples").mkdir()
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    keep = exp / "notes.tmp"  # not a temporary of ours
    keep.write_text("mine")
    Trainer(cfg(tmp_path, global_batch_size=16, max_steps=2, resume="latest")).run()
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    target = tmp_path / "out" / "x.bin"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"data"))
    assert target.read_bytes() == b"data"
    (_, synced), replaced, folder = events
    assert Path(synced).parent == target.parent and Path(synced).name.startswith(".x.bin.") and synced.endswith(".tmp")
    assert replaced == ("replace", str(target)) and folder == ("fsync", str(target.parent))


@pytest.mark.parametrize("full_at", ["checkpoint", "model"])
def test_full_disk_stops_naming_the_intact_checkpoint(tmp_path, monkeypatch, capsys, full_at):
    """ENOSPC from the writer (as torch.save through a file, or the safetensors bytes, report it):
    one sentence naming the folder and the checkpoint that is intact, the run stops, nothing half-written stays."""
    calls = {"n": 0}

    def no_space(real):
        def write(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint (or model folder): the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        return write

    if full_at == "checkpoint":
        monkeypatch.setattr(torch, "save", no_space(torch.save))
    else:
        monkeypatch.setattr(checkpoints.safetensors.torch, "save", no_space(checkpoints.safetensors.torch.save))
    results = tmp_path / "results"
    assert main(["train", *TINY_FLAGS, "--max-steps", "6", "--ckpt-every", "2", "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    exp = results / "000-DiT-S-2"
    intact = exp / "checkpoints" / ("0000002.pt" if full_at == "checkpoint" else "0000004.pt")
    folder = exp / ("checkpoints" if full_at == "checkpoint" else "model")
    assert err == (f"ditkit train: error: no space left on {folder} while writing {'0000004.pt' if full_at == 'checkpoint' else 'model.safetensors'}: "
                   f"the last complete checkpoint {intact} is intact; free some space, then continue with --resume {exp}.")  # fmt: skip
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == sorted({"0000002.pt", intact.name})
    assert not list(exp.rglob("*.tmp")) and read_pt(intact)["step"] == int(intact.stem)
    assert load_model(exp / "model").config.depth == 1  # the model folder of step 2 is whole


def test_log_never_repeats_steps_after_a_kill_and_resume(tmp_path):
    """A run killed after logging steps 3 and 4 but before checkpoint 4 resumes from 2: the log
    keeps one row per step (and drops a half-written row)."""
    exp = Trainer(cfg(tmp_path, global_batch_size=16, max_steps=4, ckpt_every=2, log_every=1)).run()
    (exp / "checkpoints" / "0000004.pt").unlink()
    with open(exp / "log.csv", "a") as f:
        f.write("5,0,1.0")  # killed mid-row
    Trainer(cfg(tmp_path, global_batch_size=16, max_steps=6, ckpt_every=2, log_every=1, resume="latest")).run()
    assert logged(exp) == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, capsys):
    trainer = Trainer(cfg(tmp_path, global_batch_size=16, max_steps=8, ckpt_every=2, log_every=2))
    real_step = trainer.train_step

    def poisoned(x, y):
        loss = real_step(x, y)
        return loss * float("nan") if trainer.step >= 3 else loss

    trainer.train_step = poisoned
    with pytest.raises(FloatingPointError, match="the newest checkpoint, .*0000002.pt \\(step 2\\), is intact"):
        trainer.run()
    assert [p.name for p in (trainer.exp_dir / "checkpoints").iterdir()] == ["0000002.pt"]


# -- bad input ----------------------------------------------------------------------------------


def test_cli_train_bad_input(tmp_path, capsys):
    assert main(["train", "--data-path", str(tmp_path / "nope"), "--results-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data-path", "digits", "--global-batch-size", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(["train", "--resume", "latest", "--results-dir", str(tmp_path / "empty"), *TINY_FLAGS]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, expected",
    [
        (["--warmup-steps", "-5"], "--warmup-steps must be 0 or more, got -5."),
        ('lr = "1e-4"', "--lr must be a number (without quotes), got '1e-4' (str)."),
        ('epochs = "ten"', "--epochs must be a whole number (without quotes), got 'ten' (str)."),
        ("data_path = 5", "--data-path must be text, got 5 (int)."),
        ("log_every = 2.5", "--log-every must be a whole number, got 2.5 (float)."),
        ("sample_every = true", "--sample-every must be a whole number, got True (bool)."),
        ("num_classes = 0", "--num-classes must be positive, got 0."),
        (["--device", "tpu"], "unknown device 'tpu'; use cpu, cuda, cuda:N or auto."),
    ],
)
def test_cli_train_rejects_bad_settings_in_one_sentence(tmp_path, capsys, setting, expected):
    flags = TINY_FLAGS
    if isinstance(setting, str):  # a TOML config file; flags would win over it, so its key is left off them
        (tmp_path / "c.toml").write_text(setting + "\n")
        flags = TINY_FLAGS[2:] if setting.startswith("data_path") else TINY_FLAGS
        setting = ["--config", str(tmp_path / "c.toml")]
    assert main(["train", *flags, "--max-steps", "1", "--results-dir", str(tmp_path / "r"), *setting]) == 2
    assert capsys.readouterr().err.strip() == f"ditkit train: error: {expected}"
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_training_checkpoint_samples_with_its_own_config(tmp_path):
    exp = Trainer(cfg(tmp_path, num_heads=4, global_batch_size=16, max_steps=1, ckpt_every=1)).run()
    model = load_model(exp / "checkpoints" / "0000001.pt")
    assert model.config.num_heads == 4  # not the guess from the shapes (hidden 32 -> 1 head)
    assert torch.equal(model.final_layer.linear.weight, read_pt(exp / "checkpoints" / "0000001.pt")["ema"]["final_layer.linear.weight"])


def test_train_through_a_vae_on_gray_data(tmp_path):
    """Pixels -> AutoencoderKL latents each step (the official loop), gray digits repeated to RGB."""
    tiny_vae(tmp_path / "vae")
    exp = Trainer(cfg(tmp_path, vae=str(tmp_path / "vae"), global_batch_size=8, max_steps=2, ckpt_every=2, sample_every=2)).run()
    model = load_model(exp / "model")
    assert (model.config.in_channels, model.config.input_size) == (4, 4)  # 8 px / factor 2
    assert (exp / "samples" / "0000002.png").exists()
