"""U-ViT's official samplers against their official outputs (tests/reference/uvit/uvit_sampling.*,
made by baofff/U-ViT's dpm_solver_pp.py, dpm_solver_pytorch.py and sde.py on two tiny nets; README
there): the discrete SD schedule with DPM-Solver++ 'fast' and the official guidance form, the VP SDE
with DPM-Solver-fast and Euler-Maruyama, and the official release table."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ditkit import UViT
from ditkit.checkpoints import UVIT_RELEASES, infer_config, official_uvit_meta
from ditkit.objectives import GaussianDiffusion, VPDiffusion
from ditkit.objectives.gaussian import scaled_linear_betas
from ditkit.samplers import SAMPLERS, cfg_model
from ditkit.samplers.vp import solver_orders

from conftest import REFERENCE, rel

UVIT_REF = REFERENCE / "uvit"
CONFIGS = json.loads((UVIT_REF / "uvit_configs.json").read_text())
TIMES = json.loads((UVIT_REF / "uvit_sampling.json").read_text())
MANIFEST = json.loads((UVIT_REF / "official_state_dict_manifest.json").read_text())


@pytest.fixture(scope="module")
def ref():
    return load_file(UVIT_REF / "uvit_sampling.safetensors")


def net(ref, name):
    model = UViT(**CONFIGS[name]).eval()
    prefix = f"weights.{name}."
    model.load_state_dict({k.removeprefix(prefix): v for k, v in ref.items() if k.startswith(prefix)}, strict=True)
    return model


def recording(model):
    """The network as samplers call it, noting the times it sees."""
    seen = []

    def fn(x, t, y=None):
        seen.append(float(t[0]))
        return model(x, t, y) if y is not None else model(x, t)

    return fn, seen


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("scale", [0.0, 0.4])
def test_dpm_solver_pp_on_the_sd_schedule_is_the_official(ref, steps, scale):
    """U-ViT-H's sampler: the network sees 1000 t = the 1-based step (time_offset 1); the official
    scale s is ditkit's cfg_scale 1 + s on every channel, the null class the last label."""
    model = net(ref, "latent_cond_noconv")
    diffusion = GaussianDiffusion(learn_sigma=False, schedule="scaled-linear", time_offset=1)
    z, y = ref["discrete.z"], ref["discrete.y"]
    fn, seen = recording(model)
    with torch.no_grad():
        if scale:
            guided = cfg_model(fn, 1 + scale)
            out = SAMPLERS["dpm-solver++"](guided, diffusion, torch.cat([z, z]), steps, {"y": torch.cat([y, torch.full_like(y, 10)])})[: len(z)]
        else:
            out = SAMPLERS["dpm-solver++"](fn, diffusion, z, steps, {"y": y})
    name = f"discrete.dpmpp_fast{steps}.scale{scale}"
    assert rel(out, ref[f"{name}.out"]) < 2e-6
    assert seen == pytest.approx(TIMES[name]["network_times"], rel=1e-6)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_fast_on_the_vp_sde_is_the_official(ref, steps):
    """U-ViT's pixel and L models: the continuous VP SDE, the network seeing 999 t."""
    fn, seen = recording(net(ref, "uncond"))
    with torch.no_grad():
        out = SAMPLERS["dpm-solver"](fn, VPDiffusion(), ref["vp.uncond.z"], steps)
    assert rel(out, ref[f"vp.uncond.dpm_fast{steps}.out"]) < 1e-6
    assert seen == pytest.approx(TIMES[f"vp.uncond.dpm_fast{steps}"]["network_times"], rel=1e-5)


def test_euler_maruyama_sde_and_ode_are_the_officials(ref):
    """CIFAR-10's sampler draws its noise from the global RNG in step order, none at the last step."""
    fn, _ = recording(net(ref, "uncond"))
    with torch.no_grad():
        torch.manual_seed(11)
        sde = SAMPLERS["euler-maruyama"](fn, VPDiffusion(), ref["vp.uncond.z"], 20)
        ode = SAMPLERS["euler-maruyama-ode"](fn, VPDiffusion(), ref["vp.uncond.z"], 20)
    assert rel(sde, ref["vp.uncond.em_sde20.global_seed11.out"]) < 1e-6
    assert rel(ode, ref["vp.uncond.em_ode20.out"]) < 1e-6
    with torch.no_grad():  # a generator gives its own stream: seed 11's is the global RNG's after manual_seed(11)
        same, other = (SAMPLERS["euler-maruyama"](fn, VPDiffusion(), ref["vp.uncond.z"], 20, generator=torch.Generator().manual_seed(s)) for s in (11, 12))
    assert torch.equal(same, sde) and rel(other, sde) > 1e-3


def test_solver_orders_and_the_sd_betas():
    assert solver_orders(50) == [3] * 16 + [2] and solver_orders(25) == [3] * 8 + [1] and solver_orders(9) == [3, 3, 2, 1]
    assert all(sum(solver_orders(n)) == n for n in range(1, 60))
    betas = scaled_linear_betas()
    assert betas[0] == pytest.approx(0.00085) and betas[-1] == pytest.approx(0.012) and len(betas) == 1000
    d = GaussianDiffusion(learn_sigma=False, schedule="scaled-linear", time_offset=1)
    assert d.model_timesteps(torch.tensor([0, 999])).tolist() == [1, 1000]  # the official n = k + 1
    assert d.unit_time(torch.tensor([1000.0, 1.0])).tolist() == [0.0, 1.0]
    s = d.vp_schedule()
    assert torch.allclose(s.alpha(torch.tensor([1 / 1000, 1.0])) ** 2, torch.tensor(d.alphas_cumprod[[0, -1]]).float(), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_release_is_recognised_with_its_sampling(name):
    """The released configs' shapes give back their config, and the sampling their eval script uses."""
    kwargs = MANIFEST[name]["kwargs"]
    with torch.device("meta"):
        state = UViT(**kwargs).state_dict()
    c = infer_config(state)
    for k, v in kwargs.items():
        assert k == "use_checkpoint" or getattr(c, k) == v, (name, k)  # a training setting, not in the weights
    meta = official_uvit_meta(state)
    release = UVIT_RELEASES[(c.img_size, c.in_chans, c.embed_dim, c.depth)]
    assert meta["objective"] == release[1] and meta["sampling"] == release[2]
    huge = kwargs["embed_dim"] == 1152
    assert meta["objective"]["objective"] == ("gaussian" if huge else "vp")
    assert meta["sampling"]["sampler"] == ("dpm-solver++" if huge else "euler-maruyama" if kwargs["num_classes"] <= 0 else "dpm-solver")
    assert c.null_class == (1000 if kwargs["num_classes"] == 1001 else None)
