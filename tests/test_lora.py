"""LoRA through peft: the adapter file holds only the adapter, merged and unmerged outputs agree, the
base stays untouched, training lowers the loss and resumes bit for bit, `ditkit sample --lora` and
`ditkit export --lora` end to end, and one sentence for an adapter made for another model."""

import copy
import csv
import hashlib

import numpy as np
import pytest
import torch
from conftest import randomize_weights, rel
from PIL import Image
from safetensors import safe_open

import ditkit
from ditkit.checkpoints import WEIGHTS_NAME, read_pt, save_pretrained
from ditkit.cli import main
from ditkit.config import TrainConfig
from ditkit.lora import ADAPTER_WEIGHTS, add_lora, apply_adapter, lora_state, read_adapter, save_adapter
from ditkit.train import Trainer
from ditkit.utils.runs import latest_checkpoint

pytest.importorskip("peft")

TINY = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2)
FLOW = {"objective": "flow", "path": "linear", "t_sampling": "uniform", "t_mean": 0.0, "t_std": 1.0, "time_shift": 1.0, "time_scale": 1.0, "cos_loss": 0.0}
TARGETS = 2 * 5 + 1  # qkv, proj, fc1, fc2, adaLN in each of 2 blocks, and the final layer's adaLN


def tiny_base(folder, num_classes=10, seed=0, **kw):
    """A tiny flow DiT with random weights (the digits: 8x8, 1 channel, 10 classes), saved as a model folder."""
    torch.manual_seed(seed)
    model = randomize_weights(ditkit.DiT(**{**TINY, **kw}, num_classes=num_classes), seed=seed)
    return save_pretrained(model, model.config, folder, extra={"objective": FLOW, "sampling": {"sampler": "euler", "num_sampling_steps": 3, "cfg_scale": 1.0}})


def lora_cfg(tmp_path, base, **kw):
    common = dict(data_path="digits", init_from=str(base), lora_rank=4, results_dir=str(tmp_path / "results"), global_batch_size=32,
                  num_workers=0, max_steps=4, log_every=1, ckpt_every=2, lr=1e-2, ema_decay=0.0)  # fmt: skip
    return TrainConfig(**{**common, **kw})


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 4-step LoRA run on the digits over a tiny base: (base folder, run folder, base file's digest before)."""
    tmp = tmp_path_factory.mktemp("lora")
    base = tiny_base(tmp / "base")
    before = digest(base / WEIGHTS_NAME)
    torch.set_num_threads(1)
    run = Trainer(lora_cfg(tmp, base)).run()
    return base, run, before


def test_adapter_holds_only_the_adapter(lora_run):
    base, run, _ = lora_run
    with safe_open(str(run / "adapter" / ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    base_keys = set(ditkit.DiT.from_pretrained(base).state_dict())
    assert len(keys) == 2 * TARGETS  # lora_A and lora_B of every targeted layer
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert not keys & base_keys
    adapter = read_adapter(run / "adapter")
    assert adapter.base == str(base.resolve()) and adapter.base_config == ditkit.DiT.from_pretrained(base).config
    ck = read_pt(latest_checkpoint(run.parent))  # the training checkpoint: the adapter and its optimizer state only
    assert set(ck["model"]) == set(ck["ema"]) and all(".lora_" in k for k in ck["model"])
    assert not (run / "model").exists()


def test_base_weights_untouched(lora_run):
    """The base file is byte for byte the same, and the base layers of the trained model equal it."""
    base, run, before = lora_run
    assert digest(base / WEIGHTS_NAME) == before
    trainer = Trainer(lora_cfg(run.parent.parent, base, resume=str(run)))
    base_state = ditkit.DiT.from_pretrained(base).state_dict()
    own = {k.replace(".base_layer", ""): v for k, v in trainer.model.state_dict().items() if ".lora_" not in k}
    assert own.keys() == base_state.keys()
    assert all(torch.equal(own[k], base_state[k]) for k in own)
    b = [v for k, v in lora_state(trainer.model).items() if "lora_B" in k]
    assert max(v.abs().max().item() for v in b) > 0  # and the adapter did train


def test_lora_steps_lower_the_loss_and_only_the_adapter_moves(one_thread):
    torch.manual_seed(0)
    model = randomize_weights(ditkit.DiT(**TINY, num_classes=3), std=0.2)  # far from the target, so LoRA has work to do
    frozen = copy.deepcopy(model.state_dict())
    add_lora(model, rank=4)
    flow = ditkit.FlowMatching()
    x, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 3
    t, noise = torch.rand(8), torch.randn(8, 1, 8, 8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = flow.training_losses(model, x, t, noise=noise, y=y)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(now[k], frozen[k]) for k in frozen)


def test_resume_continues_bitwise(tmp_path, one_thread):
    """4 steps straight equal 2 steps, then --resume to 4: adapter, EMA and AdamW state bit for bit."""
    base = tiny_base(tmp_path / "base")
    straight = read_pt(latest_checkpoint(Trainer(lora_cfg(tmp_path / "a", base)).run().parent))
    first = Trainer(lora_cfg(tmp_path / "b", base, max_steps=2)).run()
    trainer = Trainer(lora_cfg(tmp_path / "b", base, resume=str(first)))
    assert trainer.step == 2
    resumed = read_pt(latest_checkpoint(trainer.run().parent))
    assert straight["step"] == resumed["step"] == 4
    for key in ("model", "ema"):
        assert straight[key].keys() == resumed[key].keys()
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key])
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(straight["opt"]["state"].values(), resumed["opt"]["state"].values()))
    with open(first / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_merged_and_unmerged_agree(tmp_path, one_thread):
    torch.manual_seed(0)
    base = randomize_weights(ditkit.DiT(**TINY, num_classes=3))
    model = copy.deepcopy(base)
    add_lora(model, rank=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, tmp_path / "adapter", base.config)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        unmerged, plain = model.eval()(x, t, y), base(x, t, y)
        merged_model = apply_adapter(copy.deepcopy(base), read_adapter(tmp_path / "adapter"))
        merged = merged_model(x, t, y)
    assert rel(merged, unmerged) < 1e-5
    assert rel(unmerged, plain) > 1e-2  # the adapter changes the output
    assert merged_model.state_dict().keys() == base.state_dict().keys()  # a plain DiT again


def _images(folder):
    return np.stack([np.array(Image.open(p)) for p in sorted(folder.glob("0*.png"))])


def test_sample_and_export_with_lora_cli(lora_run, tmp_path, one_thread):
    """`sample --lora` (the base from the adapter) equals sampling the `export --lora` merged folder,
    and differs from the base."""
    base, run, _ = lora_run
    adapter = run / "adapter"
    common = ["--num-sampling-steps", "2", "--classes", "1", "7", "--device", "cpu"]
    assert main(["sample", "--lora", str(adapter), *common, "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", "--format", "ditkit", "--lora", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert main(["sample", "--ckpt", str(tmp_path / "merged"), *common, "--out", str(tmp_path / "m")]) == 0
    assert main(["sample", "--ckpt", str(base), *common, "--out", str(tmp_path / "base")]) == 0
    lora, merged, plain = _images(tmp_path / "lora"), _images(tmp_path / "m"), _images(tmp_path / "base")
    assert lora.shape == (8, 8, 8)
    assert np.abs(lora.astype(int) - merged.astype(int)).max() <= 1  # fp32 round-off may move a pixel by one level
    assert np.abs(lora.astype(int) - plain.astype(int)).max() > 1


def test_adapter_for_another_shape_is_one_sentence(lora_run, tmp_path, capsys):
    _, run, _ = lora_run
    wide = tiny_base(tmp_path / "wide", hidden_size=64)
    assert main(["sample", "--ckpt", str(wide), "--lora", str(run / "adapter"), "--num-sampling-steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "was made for a custom DiT (depth 2, hidden 32, patch 4)" in err and "holds a custom DiT (depth 2, hidden 64, patch 4)" in err
    assert "pass --ckpt with the model it was trained on" in err and not (tmp_path / "o").exists()


def test_foreign_adapter_with_missing_layers_is_one_sentence(tmp_path):
    """An adapter without ditkit's record of its base (any peft adapter) is checked layer by layer."""
    deep = randomize_weights(ditkit.DiT(**{**TINY, "depth": 3}, num_classes=3))
    add_lora(deep, rank=2)
    save_adapter(deep, tmp_path / "a", deep.config)
    adapter = read_adapter(tmp_path / "a")
    object.__setattr__(adapter, "base_config", None)
    with pytest.raises(ValueError, match=r"does not fit .* \(blocks\.2\.\S+, a layer it does not have\); pass --ckpt"):
        apply_adapter(ditkit.DiT(**TINY, num_classes=3), adapter)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-rank", "4"], "--lora-rank trains an adapter on an existing model; pass --init-from"),
        (["--lora-alpha", "8"], "add --lora-rank R"),
        (["--init-from", "BASE", "--lora-rank", "4", "--lora-targets", "attn.nope"], "--lora-targets attn.nope names no Linear layer"),
        (["--init-from", "BASE", "--lora-rank", "4", "--image-size", "16"], "takes 1-channel 8x8"),
        (["--init-from", "BASE", "--lora-rank", "4", "--objective", "flow", "--path", "gvp"], "is a model with path linear; drop --path gvp"),
        (["--init-from", "BASE", "--objective", "gaussian", "--lora-rank", "4", "--learn-sigma"], None),
    ],
)
def test_train_lora_bad_input(flags, message, tmp_path, capsys, one_thread):
    base = tiny_base(tmp_path / "base")
    flags = [str(base) if f == "BASE" else f for f in flags]
    rc = main(["train", "--data-path", "digits", "--num-workers", "0", "--global-batch-size", "16", "--max-steps", "1",
               "--results-dir", str(tmp_path / "r"), *flags])  # fmt: skip
    err = capsys.readouterr().err.strip()
    if message is None:  # --objective gaussian is the default, so the base's flow objective is kept
        run = next((tmp_path / "r").glob("*-lora"))
        assert rc == 0 and read_adapter(run / "adapter").config.r == 4
        assert read_pt(latest_checkpoint(tmp_path / "r"))["objective"]["objective"] == "flow"
        return
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_default_sampler_is_checked_against_the_bases_objective(tmp_path, one_thread):
    """--init-from a flow model with a flow sampler or a flow-only setting and no --objective:
    accepted (the objective is the base's); a diffusion sampler is refused once it is known."""
    base = tiny_base(tmp_path / "base")
    trainer = Trainer(lora_cfg(tmp_path, base, max_steps=1, default_sampler="heun", default_steps=2))
    assert trainer.cfg.objective == "flow" and trainer.cfg.default_sampler == "heun"
    trainer = Trainer(lora_cfg(tmp_path, base, max_steps=1, t_sampling="logit-normal"))
    assert trainer.cfg.objective == "flow" and trainer.cfg.t_sampling == "logit-normal"
    with pytest.raises(ValueError, match="does not sample flow models"):
        Trainer(lora_cfg(tmp_path, base, max_steps=1, default_sampler="ddim"))


def test_init_from_without_lora_fine_tunes_every_weight(tmp_path, one_thread):
    """--init-from alone: the run starts at the base's weights (model and EMA), trains all of them
    and writes a full model folder."""
    base = tiny_base(tmp_path / "base")
    trainer = Trainer(lora_cfg(tmp_path, base, lora_rank=0, max_steps=1))
    start = ditkit.DiT.from_pretrained(base).state_dict()
    assert all(torch.equal(trainer.model.state_dict()[k], v) and torch.equal(trainer.ema.state_dict()[k], v) for k, v in start.items())
    run = trainer.run()
    tuned = ditkit.DiT.from_pretrained(run / "model").state_dict()
    assert run.name.endswith("-finetune") and not torch.equal(tuned["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
