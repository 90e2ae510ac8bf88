"""Training on the CPU: overfitting, bitwise resume, DDP parity, checkpoint safety, NaN stop."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import ditkit
from ditkit.checkpoints import load_model, read_pt
from ditkit.cli import main
from ditkit.config import TrainConfig
from ditkit.train import Trainer, latest_checkpoint

TINY = dict(model="DiT-S/2", depth=2, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, log_every=2)


def cfg(tmp_path, **kw):
    return TrainConfig(**{**TINY, "results_dir": str(tmp_path / "results"), **kw})


def final_state(exp_dir):
    ck = read_pt(latest_checkpoint(exp_dir.parent))
    return ck["model"], ck["ema"]


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
    # 1618 digits / batch 512 = 3 steps per epoch: 8 steps cross two epoch ends, resume lands mid-epoch.
    common = dict(global_batch_size=512, ckpt_every=4, log_every=1)
    straight = Trainer(cfg(tmp_path / "a", max_steps=8, **common)).run()
    Trainer(cfg(tmp_path / "b", max_steps=4, **common)).run()
    resumed = Trainer(cfg(tmp_path / "b", max_steps=8, resume="latest", **common)).run()
    (m1, e1), (m2, e2) = final_state(straight), final_state(resumed)
    assert read_pt(latest_checkpoint(resumed.parent))["step"] == 8
    for a, b in ((m1, m2), (e1, e2)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert not torch.equal(m1["final_layer.linear.weight"], torch.zeros_like(m1["final_layer.linear.weight"]))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, kwargs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    Trainer(TrainConfig(**kwargs)).run()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_gloo_equals_one_process(tmp_path, parallel):
    kw = dict(TINY, global_batch_size=32, max_steps=3, ckpt_every=3)
    one = Trainer(TrainConfig(**kw, results_dir=str(tmp_path / "one"))).run()
    kw.update(parallel=parallel, sample_every=3)  # under FSDP every rank joins the grid's forwards
    mp.spawn(_ddp_worker, args=(2, _free_port(), dict(kw, results_dir=str(tmp_path / "two"))), nprocs=2, join=True)
    two = latest_checkpoint(tmp_path / "two").parent.parent
    assert (two / "samples" / "0000003.png").exists()
    (m1, e1), (m2, e2) = final_state(one), final_state(two)
    for a, b in ((m1, m2), (e1, e2)):
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_grad_checkpointing_matches_plain(tmp_path):
    a = Trainer(cfg(tmp_path / "a", global_batch_size=16, max_steps=3, ckpt_every=3)).run()
    b = Trainer(cfg(tmp_path / "b", global_batch_size=16, max_steps=3, ckpt_every=3, grad_checkpointing=True)).run()
    (m1, _), (m2, _) = final_state(a), final_state(b)
    for k in m1:
        assert torch.allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7), k


def test_compile_matches_plain(tmp_path):
    plain = Trainer(cfg(tmp_path / "a", global_batch_size=16, max_steps=2, ckpt_every=2))
    compiled = Trainer(cfg(tmp_path / "b", global_batch_size=16, max_steps=2, ckpt_every=2, compile=True))
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    y = torch.arange(16) % 10
    for _ in range(2):
        la, lb = plain.train_step(x, y), compiled.train_step(x, y)
        plain.step += 1
        compiled.step += 1
        assert torch.allclose(la, lb, rtol=1e-4), (la, lb)


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    trainer = Trainer(cfg(tmp_path, global_batch_size=16, max_steps=4, ckpt_every=2))
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half a file, then die
            with open(f, "wb") as fh:
                fh.write(b"\x80\x02partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    folder = trainer.exp_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["0000002.pt"]  # no partial file left behind
    assert read_pt(folder / "0000002.pt")["step"] == 2


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, capsys):
    trainer = Trainer(cfg(tmp_path, global_batch_size=16, max_steps=8, ckpt_every=2, log_every=2))
    real_step = trainer.train_step

    def poisoned(x, y):
        loss = real_step(x, y)
        return loss * float("nan") if trainer.step >= 3 else loss

    trainer.train_step = poisoned
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        trainer.run()
    assert [p.name for p in (trainer.exp_dir / "checkpoints").iterdir()] == ["0000002.pt"]


def test_cli_train_exports_ema_that_sample_loads(tmp_path, capsys):
    results = tmp_path / "results"
    rc = main(["train", "--data-path", "digits", "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
               "--global-batch-size", "16", "--max-steps", "2", "--num-workers", "0", "--results-dir", str(results),
               "--sample-every", "2"])  # fmt: skip
    assert rc == 0
    exp = next(results.iterdir())
    assert (exp / "samples" / "0000002.png").exists() and (exp / "log.csv").read_text().count("\n") == 2
    model = load_model(exp / "model")
    assert model.config.depth == 1 and model.config.num_classes == 10
    assert main(["sample", "--ckpt", str(exp / "model"), "--num-sampling-steps", "2", "--out", str(tmp_path / "s")]) == 0


def test_cli_train_bad_input(tmp_path, capsys):
    assert main(["train", "--data-path", str(tmp_path / "nope"), "--results-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data-path", "digits", "--global-batch-size", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(["train", "--resume", "latest", "--results-dir", str(tmp_path / "empty"), "--data-path", "digits",
                 "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--num-workers", "0"]) == 2  # fmt: skip
    assert "no checkpoint to resume" in capsys.readouterr().err


def test_training_checkpoint_samples_with_its_own_config(tmp_path):
    exp = Trainer(cfg(tmp_path, num_heads=4, global_batch_size=16, max_steps=1, ckpt_every=1)).run()
    model = load_model(exp / "checkpoints" / "0000001.pt")
    assert model.config.num_heads == 4  # not the guess from the shapes (hidden 32 -> 1 head)
    assert torch.equal(model.final_layer.linear.weight, read_pt(exp / "checkpoints" / "0000001.pt")["ema"]["final_layer.linear.weight"])


def test_train_through_a_vae_on_gray_data(tmp_path):
    """Pixels -> AutoencoderKL latents each step (the official loop), gray digits repeated to RGB."""
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=4, norm_num_groups=4, layers_per_block=1).save_pretrained(tmp_path / "vae")  # fmt: skip
    exp = Trainer(cfg(tmp_path, vae=str(tmp_path / "vae"), global_batch_size=8, max_steps=2, ckpt_every=2, sample_every=2)).run()
    model = load_model(exp / "model")
    assert (model.config.in_channels, model.config.input_size) == (4, 4)  # 8 px / factor 2
    assert (exp / "samples" / "0000002.png").exists()
