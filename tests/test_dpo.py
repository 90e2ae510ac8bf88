"""Diffusion-DPO: a fresh adapter's logits are 0 and its loss log 2 (both objectives), pairs are
best-against-worst per class, a few steps on a tiny model with a stand-in judge lower the loss and
raise the judge's score of new samples, the shipped classifier as judge, and bad input."""

import csv
import json
import math

import pytest
import torch
from conftest import randomize_weights
from safetensors import safe_open

import ditkit
from ditkit.checkpoints import save_pretrained
from ditkit.cli import main
from ditkit.config import DPOConfig, SamplingOptions
from ditkit.dpo import dpo_loss, make_pairs, paired_change, run_dpo, sample_images
from ditkit.lora import ADAPTER_WEIGHTS, adapter_disabled, add_lora
from ditkit.pipeline import load_pipeline

pytest.importorskip("peft")

TINY = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
FLOW = {"objective": "flow", "path": "linear", "t_sampling": "uniform", "t_mean": 0.0, "t_std": 1.0, "time_shift": 1.0, "time_scale": 1.0, "cos_loss": 0.0}


def brightness(images, y):
    """A stand-in judge: brighter images are better."""
    return images.mean((1, 2, 3))


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 3,
            torch.rand(n, generator=g), torch.randn(n, 1, 8, 8, generator=g))  # fmt: skip


@pytest.mark.parametrize("objective", [ditkit.FlowMatching(), ditkit.GaussianDiffusion(learn_sigma=True)], ids=["flow", "gaussian"])
def test_fresh_adapter_gives_log2(objective, one_thread):
    """B = 0: policy and reference agree, so every logit is 0 and the loss is log 2; the gradient
    still reaches the adapter (through B), and moving B moves the logits."""
    torch.manual_seed(0)
    model = randomize_weights(ditkit.DiT(**TINY))
    add_lora(model, rank=4)
    x_w, x_l, y, t, noise = batch()
    if isinstance(objective, ditkit.GaussianDiffusion):
        t = (t * 1000).long()
    loss, inside = dpo_loss(model, objective, x_w, x_l, y, t, noise, beta=1000.0)
    assert torch.equal(inside, torch.zeros_like(inside))
    assert abs(loss.item() - math.log(2)) < 1e-6
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    loss, inside = dpo_loss(model, objective, x_w, x_l, y, t, noise, beta=1000.0)
    assert inside.abs().max() > 1e-3  # some logits move (their mean can still sit near 0, and the loss near log 2)
    with adapter_disabled(model):  # the reference itself: logits 0 again
        assert torch.equal(dpo_loss(model, objective, x_w, x_l, y, t, noise, beta=1000.0)[1], torch.zeros(6))
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())  # disabling restored them


def test_make_pairs_best_against_worst():
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    scores = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.3, 0.7])
    win, lose = make_pairs(scores, y)
    assert win.tolist() == [1, 2, 5] and lose.tolist() == [3, 0, 4]
    win, lose = make_pairs(scores, y, min_margin=0.5)  # margins 0.8, 0.3, 0.4: only the clear pair stays
    assert win.tolist() == [1] and lose.tolist() == [3]


def test_paired_change_counts_fixed_and_broken_samples(tmp_path, one_thread):
    """40 real test images the classifier recognises; 'before' puts another class's image into 5
    slots, 'after' into 3 others: 5 fixed, 3 broken, a change of +2/40 and its paired error."""
    import numpy as np

    from ditkit.eval.classifier import classifier_predictions, load_classifier
    from ditkit.eval.npz import fashion_mnist

    images, labels = fashion_mnist("test")
    right = np.flatnonzero(classifier_predictions(load_classifier()[0], images[:400]) == labels[:400])[:40]
    x, y = images[right], labels[right]

    def misplaced(i):  # an image of x the classifier calls another class than slot i's
        return x[np.flatnonzero(y != y[i])[0]]

    before, after = x.copy(), x.copy()
    for i in range(5):
        before[i] = misplaced(i)
    for i in range(37, 40):
        after[i] = misplaced(i)
    np.savez(tmp_path / "b.npz", arr_0=before, labels=y)
    np.savez(tmp_path / "a.npz", arr_0=after, labels=y)
    p = paired_change(tmp_path / "b.npz", tmp_path / "a.npz")
    assert (p["fixed"], p["broken"]) == (5, 3)
    assert p["change"] == pytest.approx(2 / 40)
    assert p["paired_se"] == pytest.approx(math.sqrt((8 / 40 - (2 / 40) ** 2) / 40))


@pytest.fixture
def tiny_flow(tmp_path):
    torch.manual_seed(0)
    model = randomize_weights(ditkit.DiT(**TINY), std=0.1)
    return save_pretrained(model, model.config, tmp_path / "base", extra={"objective": FLOW, "sampling": {"sampler": "euler", "num_sampling_steps": 4, "cfg_scale": 1.0}})


def test_dpo_steps_lower_the_loss_and_raise_the_judge(tiny_flow, tmp_path, one_thread):
    cfg = DPOConfig(ckpt=str(tiny_flow), out=str(tmp_path / "dpo"), samples_per_class=8, min_margin=0.0, steps=40, batch_size=8, lr=1e-2, beta=200.0,
                    eval_samples=0, log_every=5, device="cpu")  # fmt: skip
    adapter = run_dpo(cfg, judge=brightness)
    with open(tmp_path / "dpo" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["loss"]) < math.log(2) + 0.05  # starts at log 2 (the first 5 steps' mean)
    assert float(rows[-1]["loss"]) < 0.3 and float(rows[-1]["implicit_acc"]) >= 0.9 and float(rows[-1]["reward_margin"]) > 1
    with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as f:
        assert all(".lora_" in k for k in f.keys())
    report = json.loads((tmp_path / "dpo" / "report.json").read_text())
    assert report["settings"]["steps"] == 40 and report["pairs"] == 12 and "before" not in report  # eval_samples=0: no evaluation
    # New samples (other seeds than the pairs') are brighter with the adapter than without.
    y = torch.arange(24) % 3
    base = load_pipeline(SamplingOptions(ckpt=str(tiny_flow), device="cpu"))
    tuned = load_pipeline(SamplingOptions(lora=str(adapter), device="cpu"))  # the base the adapter records
    before = brightness(sample_images(base, y, 7, 24, "before")[1], y).mean()
    after = brightness(sample_images(tuned, y, 7, 24, "after")[1], y).mean()
    assert after > before + 0.05, (before, after)


def test_classifier_judge(one_thread):
    from ditkit.eval.classifier import classifier_judge

    judge = classifier_judge()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    p = judge(x, torch.tensor([0, 1, 2, 9]))
    assert p.shape == (4,) and (p >= 0).all() and (p <= 1).all()
    assert torch.allclose(sum(judge(x, torch.full((4,), c)) for c in range(10)), torch.ones(4), atol=1e-5)  # a distribution over the classes
    with pytest.raises(ValueError, match="judges 1x32x32 images of classes 0-9, but this model makes 1x8x8 ones"):
        judge(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]))


def test_dpo_cli_bad_input(tiny_flow, tmp_path, capsys, one_thread):
    """The default judge on a model it cannot judge, and an odd sample count: one sentence each."""
    assert main(["dpo", "--ckpt", str(tiny_flow), "--samples-per-class", "2", "--eval-samples", "0", "--steps", "1",
                 "--out", str(tmp_path / "d"), "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the Fashion-MNIST classifier judges 1x32x32 images" in err  # before any sampling
    assert main(["dpo", "--samples-per-class", "3"]) == 2
    assert "--samples-per-class 3 is odd" in capsys.readouterr().err


def test_dpo_min_margin_no_pairs(tiny_flow, tmp_path, one_thread):
    """A margin no pair reaches is refused in one sentence that names the widest gap, before training."""
    cfg = DPOConfig(ckpt=str(tiny_flow), out=str(tmp_path / "dpo"), samples_per_class=4, steps=1, min_margin=5.0, eval_samples=0, device="cpu")
    with pytest.raises(ValueError, match=r"no pair of the 12 samples differs by --min-margin 5 .*the widest gap is \d"):
        run_dpo(cfg, judge=brightness)
    assert not (tmp_path / "dpo" / "adapter").exists()
