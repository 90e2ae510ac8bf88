"""Every sampler on exact 'networks' for Gaussian data, where the answer is known; guidance as
one batched pass and its interval; the errors a wrong pairing gets."""

import numpy as np
import pytest
import torch

import ditkit
from ditkit.config import SAMPLER_OBJECTIVE

MEAN, STD = 0.5, 0.4  # the data: N(MEAN, STD^2) per pixel
SHAPE = (1, 4, 4)


class GaussianEps(torch.nn.Module):
    """The exact eps prediction E[eps | x_t] for N(MEAN, STD^2) data under the paper's diffusion
    (label y < 10 shifts the mean by 0.1 y, so guidance has something to push). Between steps
    (DPM-Solver++ evaluates at fractional ones) log alpha-bar is linear, as DPM-Solver reads a
    discrete schedule; `vp` makes it the exact eps of U-ViT's continuous VP SDE (time 999 t)."""

    num_classes = 10

    def __init__(self, learn_sigma=False, vp=False):
        super().__init__()
        self.log_ab = torch.from_numpy(np.log(ditkit.GaussianDiffusion().alphas_cumprod)).float()
        self.learn_sigma, self.vp, self.calls = learn_sigma, vp, []

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.vp:
            s = t.float() / 999
            return torch.exp(-(0.1 * s + 19.9 * s**2 / 2))
        k = t.float().clamp(0, len(self.log_ab) - 1)
        lo = k.floor().long().clamp(max=len(self.log_ab) - 2)
        return torch.exp(self.log_ab[lo] + (k - lo) * (self.log_ab[lo + 1] - self.log_ab[lo]))

    def forward(self, x, t, y):
        self.calls.append(len(x))
        ab = self.alpha_bar(t).view(-1, 1, 1, 1)
        m = MEAN + 0.1 * torch.where(y < 10, y, 0).float().view(-1, 1, 1, 1)  # 10 is the null label
        eps = (1 - ab).sqrt() / (ab * STD**2 + 1 - ab) * (x - ab.sqrt() * m)
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[data - noise | x_t] of the linear path for N(m, STD^2) data, where label
    y < 10 shifts the mean m by `shift` * y (a weaker model of the same data: a smaller shift)."""

    num_classes = 10

    def __init__(self, shift=0.1):
        super().__init__()
        self.calls, self.shift = [], shift

    def forward(self, x, t, y):
        self.calls.append(len(x))
        t = t.view(-1, 1, 1, 1)
        m = MEAN + self.shift * torch.where(y < 10, y, 0).float().view(-1, 1, 1, 1)  # 10 is the null label
        var = t**2 * STD**2 + (1 - t) ** 2
        centred = x - t * m
        return m + (t * STD**2 - (1 - t)) / var * centred


def draw(model, objective, sampler, steps, n=2000, **kw):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, *SHAPE, generator=g)
    y = torch.zeros(n, dtype=torch.long)
    return ditkit.sample(model, objective, z, y, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1), **kw)


GAUSSIAN = [s for s, o in SAMPLER_OBJECTIVE.items() if o == "gaussian"]
FLOW = [s for s, o in SAMPLER_OBJECTIVE.items() if o == "flow"]
VP = [s for s, o in SAMPLER_OBJECTIVE.items() if o == "vp"]


@pytest.mark.parametrize("sampler", GAUSSIAN)
def test_diffusion_samplers_reach_the_data_distribution(sampler):
    # Deterministic samplers shrink the spread at few steps (their last step lands on the posterior
    # mean from a noise level well above 0); enough steps remove that.
    steps = {"ddpm": 250, "ddim": 100}.get(sampler, 50)
    x = draw(GaussianEps(), ditkit.GaussianDiffusion(learn_sigma=False), sampler, steps)
    assert abs(x.mean() - MEAN) < 0.02, x.mean()
    assert abs(x.std() / STD - 1) < 0.04, x.std()


@pytest.mark.parametrize("sampler", VP)
def test_vp_samplers_reach_the_data_distribution(sampler):
    steps = {"dpm-solver": 20, "euler-maruyama": 1000, "euler-maruyama-ode": 500}[sampler]
    x = draw(GaussianEps(vp=True), ditkit.objectives.VPDiffusion(), sampler, steps)
    assert abs(x.mean() - MEAN) < 0.02, x.mean()
    assert abs(x.std() / STD - 1) < 0.04, x.std()


@pytest.mark.parametrize("sampler", FLOW)
def test_flow_samplers_reach_the_data_distribution(sampler):
    steps = {"euler": 100, "heun": 10, "heun2": 10, "dpm++2m-flow": 10, "dopri5": 1, "sde-euler": 100, "sde-heun": 50}[sampler]
    x = draw(GaussianVelocity(), ditkit.FlowMatching(), sampler, steps)
    assert abs(x.mean() - MEAN) < 0.02, x.mean()
    assert abs(x.std() / STD - 1) < 0.04, x.std()


def test_higher_order_beats_first_order_at_equal_calls():
    """At 10 model calls, DPM-Solver++ and UniPC land closer to the data's spread than DDIM, and
    Heun (5 steps, 10 calls) closer than Euler (10 steps)."""
    diffusion = ditkit.GaussianDiffusion(learn_sigma=False)
    err = {s: abs(draw(GaussianEps(), diffusion, s, 10).std() / STD - 1) for s in ("ddim", "dpm++2m", "unipc")}
    assert err["dpm++2m"] < err["ddim"] and err["unipc"] < err["ddim"], err
    flow = ditkit.FlowMatching()
    euler = abs(draw(GaussianVelocity(), flow, "euler", 10).std() / STD - 1)
    heun = abs(draw(GaussianVelocity(), flow, "heun2", 5).std() / STD - 1)
    assert heun < euler, (heun, euler)


def test_flow_dpm_solver_is_second_order():
    """On Gaussian data the flow ODE carries noise z to x_t = t MEAN + sqrt(t^2 STD^2 + (1 - t)^2) z
    exactly. Half way (t = 0.5) DPM-Solver++(2M)'s error shrinks about fourfold when its steps
    double, where Euler's halves; at the end it lands nearer at 10 calls than Euler at 10 and EDM's
    Heun at 9 (5 steps); its first step, from pure noise, is Euler's."""
    n = 64
    z = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0))

    def err(sampler, steps, at=1.0):
        seen = {}
        ditkit.sample(GaussianVelocity(), ditkit.FlowMatching(), z, torch.zeros(n, dtype=torch.long), sampler=sampler, steps=steps,
                          callback=lambda d: seen.setdefault(round(float(d["t"]), 6), d["x"]))  # fmt: skip
        exact = at * MEAN + (at**2 * STD**2 + (1 - at) ** 2) ** 0.5 * z
        return (seen[at] - exact).abs().max().item()

    assert err("dpm++2m-flow", 10, 0.5) / err("dpm++2m-flow", 20, 0.5) > 3.5
    assert 1.7 < err("euler", 10, 0.5) / err("euler", 20, 0.5) < 2.3
    assert err("dpm++2m-flow", 10) < err("heun", 5) < err("euler", 10)
    assert err("dpm++2m-flow", 20) < err("dpm++2m-flow", 10)
    assert err("dpm++2m-flow", 2, 0.5) == pytest.approx(err("euler", 2, 0.5), abs=1e-6)


@pytest.mark.parametrize("sampler", GAUSSIAN + FLOW + VP)
def test_model_calls_per_step(sampler):
    """Calls per sample: one per step (DDPM, DDIM, DPM++, UniPC, Euler, U-ViT's DPM-Solver++ and
    Euler-Maruyama), two for Heun (one on the last step for EDM's heun), steps + 1 for the SDE with
    its last step, steps // 3 + 1 steps of up to 3 calls (6 calls) for DPM-Solver-fast, adaptive for
    dopri5; a seed gives the same samples."""
    kind = SAMPLER_OBJECTIVE[sampler]
    model = GaussianVelocity() if kind == "flow" else GaussianEps(vp=kind == "vp")
    objective = {"flow": ditkit.FlowMatching(), "vp": ditkit.objectives.VPDiffusion()}.get(kind, ditkit.GaussianDiffusion(learn_sigma=False))
    a = draw(model, objective, sampler, 6, n=8)
    expected = {"heun": 11, "heun2": 12, "sde-euler": 7, "sde-heun": 13}.get(sampler, 6)
    if sampler == "dopri5":
        assert len(model.calls) > 6 and len(model.calls) % 6 == 2  # 6 calls per accepted/rejected step + 2 to start
    else:
        assert len(model.calls) == expected
    torch.testing.assert_close(draw(model, objective, sampler, 6, n=8), a, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "euler", "heun", "heun2"])
def test_a_guided_step_is_one_batched_pass(sampler):
    flow = sampler in FLOW
    model = GaussianVelocity() if flow else GaussianEps()
    objective = ditkit.FlowMatching() if flow else ditkit.GaussianDiffusion(learn_sigma=False)
    draw(model, objective, sampler, 4, n=3, cfg_scale=3.0)
    calls = {"heun2": 8, "heun": 7}.get(sampler, 4)
    assert model.calls == [6] * calls  # cond + null of 3 samples: one call of 6 per model evaluation


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_guidance_interval_halves_unguided_steps(sampler):
    flow = sampler in FLOW
    model = GaussianVelocity() if flow else GaussianEps()
    objective = ditkit.FlowMatching() if flow else ditkit.GaussianDiffusion(learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, *SHAPE, generator=g)
    y = torch.tensor([0, 5, 9])
    full = ditkit.sample(model, objective, z, y, sampler=sampler, steps=10, cfg_scale=3.0)
    model.calls.clear()
    half = ditkit.sample(model, objective, z, y, sampler=sampler, steps=10, cfg_scale=3.0, cfg_interval=(0.5, 1.0))
    assert sorted(set(model.calls)) == [3, 6] and 3 <= model.calls.count(6) <= 6  # guided only in the second half
    plain = ditkit.sample(model, objective, z, y, sampler=sampler, steps=10)
    none = ditkit.sample(model, objective, z, y, sampler=sampler, steps=10, cfg_scale=3.0, cfg_interval=(0.95, 0.96))
    whole = ditkit.sample(model, objective, z, y, sampler=sampler, steps=10, cfg_scale=3.0, cfg_interval=(0.0, 1.0))
    assert not torch.allclose(half, full) and not torch.allclose(half, plain)
    torch.testing.assert_close(none, plain)  # no step falls in [0.95, 0.96]: no guidance at all
    torch.testing.assert_close(whole, full)
    # Guidance pushes the class-9 sample's mean (0.5 + 0.9) further from the unconditional mean.
    assert (full[2].mean() - MEAN) > (plain[2].mean() - MEAN)


def test_autoguidance_extrapolates_from_the_guide_in_batches_of_n():
    """guide + s (model - guide): a guide that is the model itself changes nothing at any scale; a
    weaker guide (classes half as far apart) pushes each class further out, as the model's own
    conditional and the guide's run once each per evaluation, N rows, no null half."""
    flow, model, weak = ditkit.FlowMatching(), GaussianVelocity(), GaussianVelocity(shift=0.05)
    z, y = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 5, 9])
    plain = ditkit.sample(model, flow, z, y, sampler="euler", steps=8)
    torch.testing.assert_close(ditkit.sample(model, flow, z, y, sampler="euler", steps=8, cfg_scale=3.0, guide=model), plain, rtol=0, atol=0)
    model.calls.clear()
    auto = ditkit.sample(model, flow, z, y, sampler="euler", steps=8, cfg_scale=3.0, guide=weak)
    assert model.calls == [3] * 8 and weak.calls == [3] * 8
    # The velocity field is affine in the shift, so guiding 0.1 against 0.05 at scale 3 is the exact model of shift 0.2.
    torch.testing.assert_close(auto, ditkit.sample(GaussianVelocity(shift=0.2), flow, z, y, sampler="euler", steps=8), rtol=1e-5, atol=1e-5)
    weak.calls.clear()
    late = ditkit.sample(model, flow, z, y, sampler="euler", steps=8, cfg_scale=3.0, guide=weak, cfg_interval=(0.5, 1.0))
    assert weak.calls == [3] * 4 and not torch.allclose(late, auto) and not torch.allclose(late, plain)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_apg_keeps_only_the_update_orthogonal_to_the_predicted_image(path):
    """APG at eta 1 is classifier-free guidance; at eta 0 the guided output differs from the
    conditional one only orthogonally to the conditional prediction of the image, per sample."""
    flow, model = ditkit.FlowMatching(path=path), GaussianVelocity()
    x, t, y = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2)), torch.full((3,), 0.4), torch.tensor([1, 5, 9])
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full((3,), 10)])
    cfg = ditkit.cfg_model(model, 3.0)(xx, tt, yy)[:3]
    torch.testing.assert_close(ditkit.cfg_model(model, 3.0, apg_eta=1.0, to_data=flow.data_prediction)(xx, tt, yy)[:3], cfg)
    apg = ditkit.cfg_model(model, 3.0, apg_eta=0.0, to_data=flow.data_prediction)(xx, tt, yy)[:3]
    cond = model(x, t, y)
    image = flow.data_prediction(cond, x, t)
    assert ((apg - cond).flatten(1) * image.flatten(1)).sum(1).abs().max() < 1e-4
    assert (apg - cfg).abs().max() > 1e-2
    if path == "linear":
        torch.testing.assert_close(image, x + 0.6 * cond)
    with pytest.raises(ValueError, match="APG .* is implemented for flow models"):
        ditkit.sample(GaussianEps(), ditkit.GaussianDiffusion(learn_sigma=False), x, y, sampler="ddim", steps=2, cfg_scale=2.0, apg_eta=0.0)


def test_a_guide_must_take_what_the_model_takes():
    model, guide = ditkit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3), None
    for other, words in [(dict(num_classes=4), "the guide has 4 classes but the model has 3"),
                         (dict(input_size=16), "the guide has 16 input size but the model has 8")]:  # fmt: skip
        guide = ditkit.DiT(**{**dict(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3), **other})
        with pytest.raises(ValueError, match=words):
            ditkit.sample(model, ditkit.FlowMatching(), torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), sampler="euler",
                          steps=2, cfg_scale=2.0, guide=guide)  # fmt: skip


def test_guidance_on_some_channels_only():
    model = GaussianEps(learn_sigma=True)
    guided = ditkit.cfg_model(lambda x, t, y: model(x, t, y).repeat(1, 3, 1, 1), 4.0, cfg_channels=1)
    x = torch.randn(4, 3, 4, 4)
    out = guided(x, torch.full((4,), 500), torch.tensor([1, 2, 10, 10]))
    plain = model(x, torch.full((4,), 500), torch.tensor([1, 2, 10, 10])).repeat(1, 3, 1, 1)
    assert not torch.allclose(out[:2, :1], plain[:2, :1])
    torch.testing.assert_close(out[:2, 1:], plain[:2, 1:])  # unguided channels keep each half's own output


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(sampler="euler"), "sampler euler is for flow models, but this is a gaussian model; use one of ddpm, ddim"),
        (dict(sampler="rk45"), "unknown sampler 'rk45'"),
        (dict(steps=0), "positive whole number"),
        (dict(cfg_scale=float("nan")), "finite"),
        (dict(cfg_scale=-1.0), ">= 0"),
        (dict(cfg_scale=2.0, cfg_interval=(0.8, 0.2)), "0 <= lo <= hi <= 1"),
        (dict(cfg_scale=2.0, cfg_interval=(-0.1, 0.5)), "0 <= lo <= hi <= 1"),
        (dict(cfg_scale=2.0, cfg_channels=2), "cfg_channels must lie in 1..1"),
        (dict(eta=float("nan")), "eta must be a finite"),
        (dict(sampler="ddim", time_shift=3.0), "does not take"),
    ],
)
def test_bad_sampling_arguments(kwargs, words):
    model = GaussianEps()
    model.num_classes = 10
    args = dict(sampler="ddim", steps=2) | kwargs
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        ditkit.sample(model, ditkit.GaussianDiffusion(learn_sigma=False), torch.randn(2, *SHAPE), torch.zeros(2, dtype=torch.long), **args)


def test_flow_sampler_on_a_diffusion_model_and_back():
    with pytest.raises(ValueError, match="sampler ddpm is for gaussian models, but this is a flow model"):
        ditkit.sample(GaussianVelocity(), ditkit.FlowMatching(), torch.randn(2, *SHAPE), torch.zeros(2, dtype=torch.long), sampler="ddpm")


class BlindAtTheDataEnd(GaussianVelocity):
    """The exact velocity for t < 1 and noise at t = 1, where x is the data and a model trained on
    logit-normal times has learned next to nothing (the bundled model's heun2 samples showed it)."""

    def forward(self, x, t, y):
        v = super().forward(x, t, y)
        return torch.where(t.view(-1, 1, 1, 1) >= 1, torch.randn_like(v), v)


def test_heun_takes_an_euler_step_onto_the_data():
    """EDM's Heun equals heun2 on every step before the last and never calls the model at t = 1,
    so a velocity that is wrong only there leaves its samples alone and spoils heun2's."""
    flow = ditkit.FlowMatching()
    exact = draw(GaussianVelocity(), flow, "heun", 5)
    torch.testing.assert_close(draw(BlindAtTheDataEnd(), flow, "heun", 5), exact, rtol=0, atol=0)
    euler = draw(GaussianVelocity(), flow, "euler", 9)  # the same 9 calls
    assert abs(exact.std() / STD - 1) < 0.75 * abs(euler.std() / STD - 1)
    spoiled = draw(BlindAtTheDataEnd(), flow, "heun2", 5)
    assert (spoiled - draw(GaussianVelocity(), flow, "heun2", 5)).abs().mean() > 0.05
    # Four Heun steps to t = 0.8, then Euler: the same as heun2 over the first four steps.
    model, z, y = GaussianVelocity(), torch.randn(8, *SHAPE), torch.zeros(8, dtype=torch.long)
    part = ditkit.sample(model, flow, z, y, sampler="heun", steps=5, callback=None)
    states = []
    ditkit.sample(model, flow, z, y, sampler="heun2", steps=5, callback=lambda d: states.append(d["x"]))
    v = model(states[3], torch.full((8,), 0.8), y)
    torch.testing.assert_close(part, states[3] + 0.2 * v, rtol=1e-6, atol=1e-6)


def test_time_shift_moves_the_flow_grid():
    model = GaussianVelocity()
    flow = ditkit.FlowMatching()
    draw(model, flow, "euler", 4, n=2, time_shift=3.0)
    assert np.allclose([c for c in model.calls], 2)
    grid = flow.time_grid(4, shift=3.0)
    assert grid[0] == 0 and grid[-1] == 1 and (grid[1:-1] < torch.linspace(0, 1, 5)[1:-1]).all()


def test_non_finite_samples_are_an_error():
    class Broken(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError, match="NaN"):
        ditkit.sample(Broken(), ditkit.FlowMatching(), torch.randn(2, *SHAPE), torch.zeros(2, dtype=torch.long), sampler="euler", steps=2)
