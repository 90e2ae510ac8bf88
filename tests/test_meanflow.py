"""MeanFlow: the identity and its jvp (against a closed form and finite differences through the
DiT), the adaptive weight, the guided target, the loss falling, the one- and two-step sampler,
bad input, and a run that records its objective, samples by default in one step and resumes bit
for bit."""

import pytest
import torch
from test_train import assert_same, final_state

import ditkit
from ditkit.cli import main
from ditkit.config import ObjectiveConfig, SampleConfig, TrainConfig
from ditkit.objectives.meanflow import ADAPTIVE_EPS, MeanFlow, average_velocity_jvp
from ditkit.pipeline import load_pipeline
from ditkit.train import Trainer

SMALL = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False)
MODERN = dict(mlp="swiglu", norm="rmsnorm", qk_norm=True, pos_embed="sincos+rope")


def randomised(model, seed=0):
    """Every weight random (the init zeros the gates and the output, which would hide the jvp)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model.eval()


def gaussian_flow(s: float):
    """Data N(0, s^2) per element: x_t = t x0 + (1 - t) eps has std sigma_t, the flow scales x by
    sigma_r / sigma_t, so the exact average velocity u(x, t, r) and velocity v(x, t) are closed forms."""

    def sigma(t):
        return (t**2 * s**2 + (1 - t) ** 2).sqrt()

    def u(x, t, r):
        t, r = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        return x * (sigma(r) / sigma(t) - 1) / (r - t)

    def v(x, t):
        t = t.view(-1, 1, 1, 1)
        return x * (t * s**2 - (1 - t)) / sigma(t) ** 2

    return u, v


def test_identity_target_is_the_exact_average_velocity():
    """u = v - (t - r) du/dt with du/dt from the jvp: for the closed-form average velocity of
    Gaussian data the target is u itself, and the wrong sign of the time tangent is not."""
    u_exact, v_exact = gaussian_flow(0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.8
    r = t + 0.05 + torch.rand(6, generator=g, dtype=torch.float64) * (0.95 - t)
    flow = MeanFlow(time_scale=3.0)  # the network sees scaled times; the derivative is in unit time

    def model_fn(x, t, r, y):
        return u_exact(x, t / 3.0, r / 3.0)

    v = v_exact(x, t)
    du_dt = average_velocity_jvp(flow, model_fn, x, t, r, v, torch.zeros(6, dtype=torch.long), {})
    target = v - (t - r).view(-1, 1, 1, 1) * du_dt
    torch.testing.assert_close(target, u_exact(x, t, r), rtol=1e-9, atol=1e-9)
    assert (du_dt.abs() > 1e-3).any()  # a field whose average does change along the path
    _, wrong = torch.func.jvp(lambda x, s: model_fn(x, 3 * s, 3 * r, None), (x, t), (v, -torch.ones_like(t)))
    assert (v - (t - r).view(-1, 1, 1, 1) * wrong - u_exact(x, t, r)).abs().max() > 1e-2


@pytest.mark.parametrize("modern", [False, True], ids=["paper", "swiglu-rmsnorm-qknorm-rope"])
def test_jvp_through_the_dit_equals_finite_differences(modern):
    """The jvp's d/dt u = v . d_x u + d_t u through a DiT (SDPA's math path, RMSNorm, RoPE) against
    a central difference along (v, 1), in float64."""
    model = randomised(ditkit.DiT(**SMALL, **(MODERN if modern else {}), time_inputs=2)).double()
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64) * 0.5
    r = t + 0.3
    y = torch.tensor([0, 3, 7, 10])  # 10: the null class
    flow = MeanFlow()
    du_dt = average_velocity_jvp(flow, model, x, t, r, v, y, {})
    h = 1e-3  # the timestep embedding reads t in float32: a smaller step would measure its rounding
    with torch.no_grad():
        fd = (model(x + h * v, t + h, y, r=r) - model(x - h * v, t - h, y, r=r)) / (2 * h)
    assert ((du_dt - fd).norm() / fd.norm()).item() < 1e-4
    with torch.no_grad():  # and r does matter: the time tangent is not the interval's
        fd_both = (model(x + h * v, t + h, y, r=r + h) - model(x - h * v, t - h, y, r=r - h)) / (2 * h)
    assert ((du_dt - fd_both).norm() / fd.norm()).item() > 1e-2


def test_training_losses_target_share_and_adaptive_weight():
    """The last round(share N) rows train on the identity target with r > t, the others on v at
    r = t; the loss is ||u - u_tgt||^2 / (||u - u_tgt||^2 + c)^p, per sample."""
    model = randomised(ditkit.DiT(**SMALL, time_inputs=2)).double()
    flow = MeanFlow(share=0.5, power=0.75)
    g = torch.Generator().manual_seed(2)
    data, noise = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    tr = flow.draw_t(4, g).double()
    assert tr.shape == (4, 2) and (tr[:, 0] <= tr[:, 1]).all()
    y = torch.tensor([1, 2, 3, 4])
    terms = flow.training_losses(model, data, tr, noise=noise, y=y)
    t, r = tr[:, 0], torch.cat([tr[:2, 0], tr[2:, 1]])
    tt = t.view(-1, 1, 1, 1)
    xt, v = tt * data + (1 - tt) * noise, data - noise
    h = 1e-3
    with torch.no_grad():
        u = model(xt, t, y, r=r)
        fd = (model(xt + h * v, t + h, y, r=r) - model(xt - h * v, t - h, y, r=r)) / (2 * h)
    target = v - (t - r).view(-1, 1, 1, 1) * fd
    sq = ((u - target) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(terms["loss"], sq / (sq + ADAPTIVE_EPS) ** 0.75, rtol=1e-5, atol=0)  # u in float32, as FlowMatching's
    torch.testing.assert_close(terms["mse"], sq / 64, rtol=1e-5, atol=0)
    assert (r[2:] > t[2:]).all() and torch.equal(r[:2], t[:2])


def test_guided_target_mixes_the_models_own_velocities():
    """v_g = omega v + kappa u(x, t, t | y) + (1 - omega - kappa) u(x, t, t | null), and v itself
    where the label was dropped: read off a stand-in network whose output is its label."""
    flow = MeanFlow(omega=1.5, kappa=0.25, null_class=10)
    calls = []

    def model_fn(x, t, y, r=None):
        calls.append(len(x))
        return y.double().view(-1, 1, 1, 1).expand_as(x) + 0 * x

    x, v = torch.zeros(3, 1, 2, 2, dtype=torch.float64), torch.full((3, 1, 2, 2), 2.0, dtype=torch.float64)
    y = torch.tensor([4, 10, 6])
    v_g = flow.guided_velocity(model_fn, x, torch.rand(3), v, y)
    expected = torch.tensor([1.5 * 2 + 0.25 * 4 - 0.75 * 10, 2.0, 1.5 * 2 + 0.25 * 6 - 0.75 * 10], dtype=torch.float64)
    torch.testing.assert_close(v_g[:, 0, 0, 0], expected)
    assert calls == [6]  # conditional and null in one batch
    assert MeanFlow().guided_velocity(model_fn, x, torch.rand(3), v, y) is v  # no guidance, no call


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = ditkit.DiT(**SMALL, time_inputs=2)
    flow = MeanFlow(t_sampling="logit-normal", share=0.5, omega=1.0, kappa=0.5, null_class=10)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    y, noise = torch.arange(16) % 11, torch.randn(16, 1, 8, 8)
    t = flow.draw_t(16, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mse = []
    for _ in range(100):
        terms = flow.training_losses(model.train(), x0, t, noise=noise, y=y)
        opt.zero_grad()
        terms["loss"].mean().backward()
        opt.step()
        mse.append(terms["mse"].mean().item())
    assert mse[-1] < mse[0] / 3


def test_one_and_two_step_sampling():
    """One step is x + u(x, 0, 1); two are jumps over [0, 1/2] and [1/2, 1]; a batch equals its
    singles, and the same noise gives the same samples."""
    model = randomised(ditkit.DiT(**SMALL, time_inputs=2))
    flow = MeanFlow()
    noise, y = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 5, 9])
    one = ditkit.sample(model, flow, noise, y, steps=1)  # meanflow is the default sampler of a MeanFlow
    with torch.no_grad():
        zero, half, full = torch.zeros(3), torch.full((3,), 0.5), torch.ones(3)
        torch.testing.assert_close(one, noise + model(noise, zero, y, r=full))
        mid = noise + 0.5 * model(noise, zero, y, r=half)
        torch.testing.assert_close(ditkit.sample(model, flow, noise, y, sampler="meanflow", steps=2), mid + 0.5 * model(mid, half, y, r=full))
    assert one.shape == noise.shape and not torch.allclose(one, noise)
    torch.testing.assert_close(torch.cat([ditkit.sample(model, flow, noise[i : i + 1], y[i : i + 1], steps=1) for i in range(3)]), one)
    assert torch.equal(ditkit.sample(model, flow, noise, y, steps=1), one)
    euler = ditkit.sample(model, flow, noise, y, sampler="euler", steps=1)  # the flow samplers read u at r = t
    torch.testing.assert_close(euler, noise + model(noise, zero, y).detach())
    # guidance on t in [0.5, 1] only: the first jump unguided, the second guided (r sliced with the batch)
    guided = ditkit.sample(model, flow, noise, y, sampler="meanflow", steps=2, cfg_scale=2.0, cfg_interval=(0.5, 1.0))
    with torch.no_grad():
        mid = noise + 0.5 * model(noise, zero, y, r=half)
        cond, null = model(mid, half, y, r=full), model(mid, half, torch.full_like(y, 10), r=full)
        torch.testing.assert_close(guided, mid + 0.5 * (null + 2.0 * (cond - null)))


def test_bad_input_is_one_sentence():
    one_time = ditkit.DiT(**SMALL)
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="the meanflow sampler needs a network that takes the interval"):
        ditkit.sample(one_time, MeanFlow(), noise, y, steps=1)
    with pytest.raises(ValueError, match="takes one time .* call it without r"):
        one_time(noise, torch.zeros(2), y, r=torch.ones(2))
    assert "h_embedder.mlp.0.weight" not in one_time.state_dict()  # official keys untouched
    assert "h_embedder.mlp.0.weight" in ditkit.DiT(**SMALL, time_inputs=2).state_dict()
    with pytest.raises(ValueError, match="sampler meanflow is for meanflow models, but this is a flow model"):
        ditkit.sample(one_time, ditkit.FlowMatching(), noise, y, sampler="meanflow", steps=1)
    with pytest.raises(ValueError, match="path only apply to --objective flow"):
        ObjectiveConfig(objective="meanflow", path="gvp")
    with pytest.raises(ValueError, match="mf_share only apply to --objective meanflow"):
        ObjectiveConfig(objective="flow", mf_share=0.5)
    with pytest.raises(ValueError, match="prediction only apply to --objective flow"):
        ObjectiveConfig(objective="meanflow", prediction="data")  # MeanFlow's network outputs a velocity
    with pytest.raises(ValueError, match="mf_power only apply to --objective meanflow"):
        ObjectiveConfig(objective="vp", mf_power=0.0)
    with pytest.raises(ValueError, match="t_mean only apply to --objective flow or --objective meanflow"):
        ObjectiveConfig(objective="gaussian", t_mean=-0.4)
    with pytest.raises(ValueError, match="U-ViT-S/2 takes one, so use a DiT"):
        TrainConfig(model="U-ViT-S/2", objective="meanflow")
    with pytest.raises(ValueError, match="--mf-kappa must be less than 1"):
        ObjectiveConfig(objective="meanflow", mf_kappa=1.0)
    with pytest.raises(ValueError, match=r"pairs of shape \(N, 2\)"):
        MeanFlow().training_losses(ditkit.DiT(**SMALL, time_inputs=2), noise, torch.rand(2), y=y)
    with pytest.raises(ValueError, match="needs the model's null class"):
        MeanFlow(omega=2.0).training_losses(ditkit.DiT(**SMALL, time_inputs=2), noise, torch.rand(2, 2).sort(1).values, y=y)


TINY = dict(model="DiT-S/2", depth=2, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, log_every=1, learn_sigma=False,
            objective="meanflow", t_sampling="logit-normal", t_mean=-0.4, mf_share=0.5, mf_kappa=0.5)  # fmt: skip


def test_run_records_meanflow_samples_in_one_step_and_resumes_bitwise(tmp_path, capsys):
    """4 steps straight equal 2, then a bare resume to 4 (weights, EMA, AdamW, bit for bit); the
    model records its objective and samples by MeanFlow in 1 step by default, 2 when asked."""
    common = dict(global_batch_size=16, ckpt_every=2)
    straight = Trainer(TrainConfig(**TINY, **common, max_steps=4, results_dir=str(tmp_path / "a"))).run()
    Trainer(TrainConfig(**TINY, **common, max_steps=2, results_dir=str(tmp_path / "b"))).run()
    resumed = Trainer(TrainConfig(results_dir=str(tmp_path / "b"), resume="latest", max_steps=4)).run()
    a, b = final_state(straight), final_state(resumed)
    for key in ("model", "ema", "opt"):
        assert_same(a[key], b[key], key)
    torch.manual_seed(0)  # the run's initial weights: the interval's embedder has learnt
    init = ditkit.DiT(ditkit.DiTConfig(**a["model_config"])).state_dict()
    assert not torch.allclose(a["model"]["h_embedder.mlp.0.weight"], init["h_embedder.mlp.0.weight"])
    assert a["objective"] == {"objective": "meanflow", "t_sampling": "logit-normal", "t_mean": -0.4, "t_std": 1.0, "time_scale": 1.0,
                              "mf_share": 0.5, "mf_power": 1.0, "mf_omega": 1.0, "mf_kappa": 0.5}  # fmt: skip
    pipe = load_pipeline(SampleConfig(ckpt=str(straight), device="cpu"))
    assert isinstance(pipe.objective, MeanFlow) and (pipe.sampling.sampler, pipe.sampling.steps, pipe.sampling.cfg_scale) == ("meanflow", 1, 1.0)
    assert pipe.config.time_inputs == 2
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(straight), "--num-samples", "2", "--out", str(tmp_path / "s1")]) == 0
    assert "meanflow, 1 steps, cfg 1" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(straight), "--num-samples", "2", "--num-sampling-steps", "2", "--out", str(tmp_path / "s2")]) == 0
    assert "meanflow, 2 steps" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(straight), "--sampler", "ddim", "--out", str(tmp_path / "s3")]) == 2
    assert "use one of euler" in capsys.readouterr().err


def test_compiled_jvp_matches_plain(tmp_path):
    """With --compile the jvp runs compiled (torch.func.jvp inside the compiled region, the math
    attention): two steps give the plain run's losses and weights."""
    common = dict(TINY, global_batch_size=16, max_steps=2, ckpt_every=2)
    plain = Trainer(TrainConfig(**common, results_dir=str(tmp_path / "a"))).run()
    compiled = Trainer(TrainConfig(**common, results_dir=str(tmp_path / "b"), compile=True)).run()
    m1, m2 = final_state(plain)["model"], final_state(compiled)["model"]
    for k in m1:
        assert torch.allclose(m1[k], m2[k], rtol=1e-4, atol=1e-6), k
