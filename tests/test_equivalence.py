"""Equivalence with the official DiT code on its outputs in tests/reference/official/ (a copy of
../shared/reference/official/)."""

import json

import pytest
import torch

import ditkit

from conftest import REFERENCE, rel


@pytest.fixture(scope="module")
def ref(official_ref):
    return official_ref


def test_forward(ref):
    _, model, io = ref
    with torch.no_grad():
        out = model(io["forward.x"], io["forward.t"], io["forward.y"])
    assert rel(out, io["forward.out"]) < 1e-5


def test_cfg_forward_official_channels(ref):
    meta, model, io = ref
    guided = ditkit.cfg_model(model, meta["cfg_scale"], cfg_channels=3)
    with torch.no_grad():
        out = guided(io["cfg.x"], io["cfg.t"], io["cfg.y"])
    assert rel(out, io["cfg.out"]) < 1e-5


def test_losses_and_q_sample(ref):
    _, model, io = ref
    diffusion = ditkit.GaussianDiffusion(learn_sigma=True)
    x0, noise, t, y = io["loss.x0"], io["loss.noise"], io["loss.t"], io["loss.y"]
    assert rel(diffusion.q_sample(x0, t, noise), io["loss.x_t"]) < 1e-5
    with torch.no_grad():
        terms = diffusion.training_losses(model, x0, t, y=y, noise=noise)
    for k in ("loss", "mse", "vb"):
        assert terms[k].shape == (x0.shape[0],)
        assert rel(terms[k], io[f"loss.{k}"]) < 1e-5, k


def test_respacing_matches_official():
    table = json.loads((REFERENCE / "official" / "respacing.json").read_text())
    for spec, steps in table.items():
        assert sorted(ditkit.space_timesteps(1000, spec)) == steps, spec
        spaced = ditkit.GaussianDiffusion().respaced(spec)
        assert spaced.timestep_map == steps


@pytest.mark.parametrize("cfg", [False, True])
def test_ddim(ref, cfg):
    meta, model, io = ref
    diffusion = ditkit.GaussianDiffusion()
    kw = dict(cfg_scale=meta["cfg_scale"], cfg_channels=meta["cfg_channels"]) if cfg else {}
    out = ditkit.sample(model, diffusion, io["sample.z"], io["sample.y"], sampler="ddim", steps=meta["sample_steps"], **kw)
    assert rel(out, io["ddim_cfg.out" if cfg else "ddim.out"]) < 1e-4


def test_ddpm_same_seed_same_samples(ref):
    meta, model, io = ref
    torch.manual_seed(meta["ddpm_global_seed"])
    out = ditkit.sample(model, ditkit.GaussianDiffusion(), io["sample.z"], io["sample.y"], sampler="ddpm", steps=meta["sample_steps"])
    assert rel(out, io["ddpm.out"]) < 1e-4


def test_ddpm_generator_equals_global_seed(ref):
    meta, model, io = ref
    d = ditkit.GaussianDiffusion()
    torch.manual_seed(7)
    a = ditkit.sample(model, d, io["sample.z"], io["sample.y"], sampler="ddpm", steps=5)
    b = ditkit.sample(model, d, io["sample.z"], io["sample.y"], sampler="ddpm", steps=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_official_state_dict_manifest():
    manifest = json.loads((REFERENCE / "official" / "official_state_dict_manifest.json").read_text())
    for name, entry in manifest.items():
        preset, _, px = name.partition("@")
        with torch.device("meta"):  # shapes only: no memory, even for XL/2 at 512 px
            model = ditkit.DiT.from_preset(preset, input_size=int(px) // 8, num_classes=1000)
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert shapes == entry["state_dict"], name
        assert sum(p.numel() for p in model.parameters()) == entry["params"]
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == entry["trainable_params"]
