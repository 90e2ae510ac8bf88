"""Shapes, invariants and round trips of the model, diffusion and samplers on configs of our own."""

import argparse
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import randomize_weights, rel

import ditkit
from ditkit.checkpoints import infer_config, load_model, save_pretrained


def tiny(**kw):
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    return ditkit.DiT(**{**base, **kw})


def randomize(model, seed=0):
    return randomize_weights(model, seed, std=0.05)


@pytest.mark.parametrize(
    "kw",
    [
        dict(in_channels=1, learn_sigma=True),
        dict(in_channels=3, learn_sigma=False),
        dict(in_channels=4, patch_size=4),
        dict(in_channels=1, input_size=12, patch_size=4, learn_sigma=False),
    ],
)
def test_forward_shapes(kw):
    model = randomize(tiny(**kw))
    c = model.config
    x = torch.randn(3, c.in_channels, c.input_size, c.input_size)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 4, c.num_classes]))
    assert out.shape == (3, c.out_channels, c.input_size, c.input_size)
    assert c.out_channels == c.in_channels * (2 if c.learn_sigma else 1)


def test_initial_output_is_zero_and_gradients_flow():
    model = tiny()
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0
    loss = ditkit.GaussianDiffusion().training_losses(model.train(), x, torch.tensor([10, 900]), y=torch.tensor([0, 1]))["loss"]
    loss.mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert not model.pos_embed.requires_grad


def test_pos_embed_is_sincos():
    model = tiny(hidden_size=16, num_heads=2)
    pe = model.pos_embed[0]  # (16 tokens, 16)
    # MAE's layout: the first half encodes the column (meshgrid puts w first), frequency 1 first.
    cols = torch.arange(4).repeat(4).float()
    rows = torch.arange(4).repeat_interleave(4).float()
    assert torch.allclose(pe[:, 0], torch.sin(cols), atol=1e-6)
    assert torch.allclose(pe[:, 4], torch.cos(cols), atol=1e-6)
    assert torch.allclose(pe[:, 8], torch.sin(rows), atol=1e-6)


def test_batch_equals_singles():
    model = randomize(tiny(in_channels=1))
    d = ditkit.GaussianDiffusion()
    z = torch.randn(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])
    batch = ditkit.sample(model, d, z, y, sampler="ddim", steps=5, cfg_scale=2.0)
    singles = torch.cat([ditkit.sample(model, d, z[i : i + 1], y[i : i + 1], sampler="ddim", steps=5, cfg_scale=2.0) for i in range(3)])
    assert torch.allclose(batch, singles, rtol=1e-4, atol=1e-4)


def reference_ddim(model, z, y, steps):
    """DDIM (eta 0, eps prediction, no clipping) in float64, written from the papers rather than
    from ditkit: DiT's linear betas 1e-4..0.02 over 1000 steps, ADM's evenly spaced timesteps
    (space_timesteps(1000, str(steps))), x0 = (x - sqrt(1 - a) eps) / sqrt(a),
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    used = [round(i * 999 / (steps - 1)) for i in range(steps)]
    model, x = model.double(), z.double()
    with torch.no_grad():
        for k in reversed(range(steps)):
            a, a_prev = alphas_cumprod[used[k]], alphas_cumprod[used[k - 1]] if k else 1.0
            eps = model(x, torch.full((len(x),), used[k]), y)
            x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
            x = x0 * a_prev**0.5 + (1 - a_prev) ** 0.5 * eps
    return x


# reference_ddim on the model, noise and labels of test_golden_slice, run once and stored:
# out[:, 0, 3, :], then sum |out| and sum out over all 128 values.
GOLDEN_ROW = [[251.29106609, -28.90917288, -265.72242016, -195.9065737, 65.64718475, -84.04496676, -77.82949847, -21.69900664],
              [128.54377596, -71.86962641, -66.86365655, 124.55861885, -90.71101777, -75.02124858, 78.18798613, 304.66270267]]  # fmt: skip
GOLDEN_ABS_SUM, GOLDEN_SUM = 15866.71396036325, 205.10844789645193


def test_golden_slice():
    """A short DDIM run on fixed weights against stored values, made once by the independent
    float64 DDIM above: guards against silent numerical drift of the model or the sampler."""
    model = lambda: randomize(tiny(in_channels=1, learn_sigma=False), seed=3)  # noqa: E731
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 3])
    out = ditkit.sample(model(), ditkit.GaussianDiffusion(learn_sigma=False), z, y, sampler="ddim", steps=4).double()
    # The reference still makes the stored values: to 1e-7, since the timestep features are float32
    # sin/cos/exp, whose last bit differs between CPUs' vector units (2.5e-8 measured across two).
    for got, tol in ((out, 1e-5), (reference_ddim(model(), z, y, 4), 1e-7)):
        np.testing.assert_allclose(got[:, 0, 3].numpy(), GOLDEN_ROW, rtol=tol, atol=1e-3 * tol)
        assert got.abs().sum().item() == pytest.approx(GOLDEN_ABS_SUM, rel=tol)
        assert got.sum().item() == pytest.approx(GOLDEN_SUM, abs=tol * GOLDEN_ABS_SUM)  # a sum of both signs: scaled by |out|


def test_cfg_wrapper_semantics():
    model = randomize(tiny())
    fn = lambda x, t, y: model(x, t, y)  # noqa: E731
    assert ditkit.cfg_model(fn, 1.0) is fn
    x = torch.randn(2, 4, 8, 8)
    x = torch.cat([x, x])
    t = torch.tensor([5, 6, 5, 6])
    y = torch.tensor([1, 2, 5, 5])
    with torch.no_grad():
        raw = model(x, t, y)
        full = ditkit.cfg_model(fn, 3.0, None)(x, t, y)
        three = ditkit.cfg_model(fn, 3.0, 3)(x, t, y)
    cond, uncond = raw[:2], raw[2:]
    expect = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])
    assert torch.allclose(full[:2, :4], expect, atol=1e-5)
    assert torch.allclose(full[:2, 4:], cond[:, 4:])  # variance channels are not guided
    assert torch.allclose(three[:2, 3], cond[:, 3])  # official: the 4th latent channel is unguided
    assert torch.allclose(three[:2, :3], expect[:, :3], atol=1e-5)


def test_ddpm_fixed_variance_and_generator_reproducible():
    model = randomize(tiny(in_channels=3, learn_sigma=False))
    d = ditkit.GaussianDiffusion(learn_sigma=False)
    z = torch.randn(2, 3, 8, 8)
    y = torch.tensor([0, 1])
    a = ditkit.sample(model, d, z, y, sampler="ddpm", steps=6, generator=torch.Generator().manual_seed(3))
    b = ditkit.sample(model, d, z, y, sampler="ddpm", steps=6, generator=torch.Generator().manual_seed(3))
    c = ditkit.sample(model, d, z, y, sampler="ddpm", steps=6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_inference_close_to_fp32():
    model = randomize(tiny())
    d = ditkit.GaussianDiffusion()
    z = torch.randn(2, 4, 8, 8)
    y = torch.tensor([0, 1])
    ref = ditkit.sample(model, d, z, y, steps=3)
    low = ditkit.sample(model, d, z, y, steps=3, precision="bf16")
    assert rel(low, ref) < 0.05


def test_sample_rejects_bad_input():
    model = tiny()
    d = ditkit.GaussianDiffusion()
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="outside"):
        ditkit.sample(model, d, z, torch.tensor([5]))
    with pytest.raises(ValueError, match="positive"):
        ditkit.sample(model, d, z, torch.tensor([0]), steps=0)
    with pytest.raises(ValueError, match="sampler"):
        ditkit.sample(model, d, z, torch.tensor([0]), sampler="euler-x")
    with pytest.raises(ValueError, match="divisible"):
        ditkit.DiT(input_size=9, patch_size=2)


def test_training_losses_fixed_sigma_has_no_vb():
    model = randomize(tiny(learn_sigma=False))
    terms = ditkit.GaussianDiffusion(learn_sigma=False).training_losses(
        model, torch.randn(2, 4, 8, 8), torch.tensor([0, 999]), y=torch.tensor([0, 1])
    )
    assert set(terms) == {"loss", "mse"} and torch.equal(terms["loss"], terms["mse"])


def test_vb_trains_only_the_variance():
    model = randomize(tiny()).train()
    model.y_embedder.dropout_prob = 0.0
    x0 = torch.randn(2, 4, 8, 8)
    vb = ditkit.GaussianDiffusion().training_losses(model, x0, torch.tensor([3, 400]), y=torch.tensor([0, 1]))["vb"]
    vb.sum().backward()
    g = model.final_layer.linear.weight.grad.reshape(4, 8, -1)  # (p*p, C_out, D): eps channels first
    assert g[:, :4].abs().sum() == 0 and g[:, 4:].abs().sum() > 0


def test_presets_and_unknown_preset():
    cfg = ditkit.DiTConfig.from_preset("DiT-B/4", input_size=16, num_classes=10)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 768, 12, 4)
    assert len(ditkit.PRESETS) == 12
    with pytest.raises(ValueError, match="unknown preset"):
        ditkit.DiTConfig.from_preset("DiT-M/2")


def test_safetensors_round_trip_and_infer_config(tmp_path):
    model = randomize(tiny(in_channels=1, num_classes=7))
    save_pretrained(model, model.config, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    # The head count leaves no trace in the weights; every other field is read off the shapes.
    assert replace(infer_config(model.state_dict()), num_heads=2) == model.config


def test_official_training_checkpoint_takes_ema(tmp_path):
    model, ema = randomize(tiny(), 1), randomize(tiny(), 2)
    path = tmp_path / "0000100.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(model="DiT-S/2")}, path)
    loaded = load_model(path)
    assert torch.equal(loaded.final_layer.linear.weight, ema.final_layer.linear.weight)


def test_mismatched_checkpoint_names_keys_and_preset(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(ValueError) as e:
        load_model(path, ditkit.DiTConfig.from_preset("DiT-S/2", input_size=8, num_classes=5))
    msg = str(e.value)
    assert "missing keys" in msg and "shape mismatches" in msg and "depth 2, hidden 32" in msg
    assert "\n" not in msg
