"""Flow matching: equivalence with the official SiT code (tests/reference/sit/), and the
objective's conventions on fresh configs of our own."""

import math

import pytest
import torch

import ditkit
from conftest import rel
from ditkit.objectives.flow import shift_time

PATHS = ("linear", "gvp")


@pytest.mark.parametrize("path", PATHS)
def test_sit_interpolant_and_loss(sit_ref, path):
    _, model, io = sit_ref
    flow = ditkit.FlowMatching(path=path)
    xt, ut = flow.interpolate(io[f"{path}.data"], io[f"{path}.noise"], io[f"{path}.t"])
    assert rel(xt, io[f"{path}.xt"]) < 1e-6
    assert rel(ut, io[f"{path}.ut"]) < 1e-6
    with torch.no_grad():
        terms = flow.training_losses(model, io[f"{path}.data"], io[f"{path}.t"], y=io[f"{path}.y"], noise=io[f"{path}.noise"])
    assert terms["loss"].shape == (io[f"{path}.data"].shape[0],)
    assert rel(terms["loss"], io[f"{path}.loss"]) < 1e-5


@pytest.mark.parametrize("run", ["euler_cfg", "heun2", "dopri5"])
@pytest.mark.parametrize("path", PATHS)
def test_sit_samplers(sit_ref, path, run):
    meta, model, io = sit_ref
    r = meta["runs"][f"{path}.{run}"]
    flow = ditkit.FlowMatching(path=path)
    out = ditkit.sample(model, flow, io[f"{path}.sample.z"], io[f"{path}.sample.y"], sampler=r["sampler"], steps=r["steps"],
                        cfg_scale=r["cfg_scale"], cfg_channels=r["cfg_channels"])  # fmt: skip
    bound = 5e-3 if r["sampler"] == "dopri5" else 1e-4
    assert rel(out, io[f"{path}.{run}.out"]) < bound


def test_sit_guidance_differs_from_all_channel_guidance(sit_ref):
    """The fixture's CFG touches three of four channels: guiding all four must not match it."""
    meta, model, io = sit_ref
    flow = ditkit.FlowMatching(path="linear")
    out = ditkit.sample(model, flow, io["linear.sample.z"], io["linear.sample.y"], sampler="euler", steps=10, cfg_scale=4.0)
    assert rel(out, io["linear.euler_cfg.out"]) > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_interpolant_by_hand(path):
    g = torch.Generator().manual_seed(0)
    data, noise, t = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g), torch.rand(5, generator=g)
    flow = ditkit.FlowMatching(path=path)
    xt, ut = flow.interpolate(data, noise, t)
    tt = t.view(-1, 1, 1, 1)
    if path == "linear":
        alpha, sigma, da, ds = tt, 1 - tt, 1.0, -1.0
    else:
        alpha, sigma = torch.sin(math.pi * tt / 2), torch.cos(math.pi * tt / 2)
        da, ds = math.pi / 2 * torch.cos(math.pi * tt / 2), -math.pi / 2 * torch.sin(math.pi * tt / 2)
    torch.testing.assert_close(xt, alpha * data + sigma * noise)
    torch.testing.assert_close(ut, da * data + ds * noise)
    # The endpoints: t = 0 is noise, t = 1 is data; u_t is d x_t / dt.
    torch.testing.assert_close(flow.interpolate(data, noise, torch.zeros(5))[0], noise)
    torch.testing.assert_close(flow.interpolate(data, noise, torch.ones(5))[0], data, atol=1e-6, rtol=0)
    h = 1e-3
    fd = (flow.interpolate(data, noise, t + h)[0] - flow.interpolate(data, noise, t - h)[0]) / (2 * h)
    torch.testing.assert_close(fd, ut, atol=2e-3, rtol=2e-3)


class Oracle(torch.nn.Module):
    """A 'network' that returns the true velocity u_t of a known (data, noise) pair (or 2C
    channels, the second half junk) and records the times it is called with."""

    def __init__(self, flow, data, noise, learn_sigma):
        super().__init__()
        self.flow, self.data, self.noise, self.learn_sigma, self.times = flow, data, noise, learn_sigma, []

    def forward(self, x, t, y):
        self.times.append(t.clone())
        u = self.flow.interpolate(self.data, self.noise, t / self.flow.time_scale)[1]
        return torch.cat([u, torch.full_like(u, 7.0)], 1) if self.learn_sigma else u


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_loss_is_zero_for_the_true_velocity_and_uses_time_scale(learn_sigma):
    g = torch.Generator().manual_seed(1)
    data, noise = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    flow = ditkit.FlowMatching(path="gvp", time_scale=1000.0)
    oracle = Oracle(flow, data, noise, learn_sigma)
    t = torch.rand(4, generator=g)
    loss = flow.training_losses(oracle, data, t, noise=noise, y=torch.zeros(4, dtype=torch.long))["loss"]
    assert loss.shape == (4,) and loss.abs().max() < 1e-10
    torch.testing.assert_close(oracle.times[0], t * 1000.0)  # the network sees t * time_scale
    wrong = ditkit.FlowMatching(path="linear").training_losses(oracle, data, t, noise=noise, y=torch.zeros(4, dtype=torch.long))
    assert wrong["loss"].min() > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_x_prediction_implies_the_velocity_and_takes_its_loss(path):
    """JiT's x-prediction: a network that outputs the exact E[data | x_t] of Gaussian data gives, through
    the objective, the exact velocity E[u_t | x_t] (checked against it written out), so its
    velocity loss equals that of the exact velocity network; the clip of sigma bites only near t = 1."""
    m, s = 0.3, 0.6  # data N(m, s^2) per pixel
    flow, xflow = ditkit.FlowMatching(path=path), ditkit.FlowMatching(path=path, prediction="data")

    def posterior_mean(x, t):  # E[data | x_t] and E[noise | x_t] for x_t = alpha data + sigma noise
        a, b, _, _ = flow.alpha_sigma(t.view(-1, 1, 1, 1))
        var = a**2 * s**2 + b**2
        return m + a * s**2 / var * (x - a * m), b / var * (x - a * m)

    def exact_velocity(x, t_net, y):
        t = t_net.view(-1, 1, 1, 1)
        data, noise = posterior_mean(x, t_net)
        _, _, da, db = flow.alpha_sigma(t)
        return da * data + db * noise

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 1, 4, 4, generator=g), torch.tensor([0.0, 0.2, 0.5, 0.8, 0.94, 0.99])
    v = xflow.velocity(lambda x_, t_, y: posterior_mean(x_, t_)[0], x, t, y=None)
    torch.testing.assert_close(v[:5], exact_velocity(x, t, None)[:5], rtol=1e-5, atol=1e-5)
    assert (v[5] - exact_velocity(x, t, None)[5]).abs().max() > 1e-3  # 1 - t = 0.01 < 0.05: clipped
    data, noise = m + s * torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = t[:5].clone()
    x_loss = xflow.training_losses(lambda x_, t_, y: posterior_mean(x_, t_)[0], data[:5], t, noise=noise[:5], y=None)["loss"]
    v_loss = flow.training_losses(exact_velocity, data[:5], t, noise=noise[:5], y=None)["loss"]
    torch.testing.assert_close(x_loss, v_loss, rtol=1e-4, atol=1e-6)
    assert v_loss.min() > 1e-3


def test_time_sampling_and_shift():
    g = torch.Generator().manual_seed(0)
    uniform = ditkit.FlowMatching().draw_t(20000, generator=g)
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    ln = ditkit.FlowMatching(t_sampling="logit-normal").draw_t(20000, generator=g)
    assert abs(ln.median() - 0.5) < 0.02 and (ln - 0.5).abs().mean() < (uniform - 0.5).abs().mean()  # mass in the middle
    shifted = ditkit.FlowMatching(t_sampling="logit-normal", time_shift=3.0).draw_t(20000, generator=g)
    assert shifted.median() < 0.3  # shift 3 spends more time near noise (t = 0)
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    s = 3.0  # SD3: sigma' = s sigma / (1 + (s - 1) sigma) with sigma = 1 - t
    torch.testing.assert_close(1 - shift_time(t, s), s * (1 - t) / (1 + (s - 1) * (1 - t)))


def test_flow_config_is_recorded_and_validated():
    flow = ditkit.FlowMatching(path="gvp", t_sampling="logit-normal", time_shift=2.0)
    assert flow.config.to_dict() == {"objective": "flow", "path": "gvp", "t_sampling": "logit-normal", "t_mean": 0.0,
                                     "t_std": 1.0, "time_shift": 2.0, "time_scale": 1.0, "cos_loss": 0.0}  # fmt: skip
    with pytest.raises(ValueError, match="--path is 'vp', not one of"):
        ditkit.FlowMatching(path="vp")
    with pytest.raises(ValueError, match="--time-shift must be positive"):
        ditkit.FlowMatching(time_shift=0.0)
    with pytest.raises(ValueError, match="--prediction is 'noise', not one of velocity, data"):
        ditkit.FlowMatching(prediction="noise")
    with pytest.raises(ValueError, match="prediction only apply to --objective flow"):
        ditkit.ObjectiveConfig(objective="gaussian", prediction="data")
    assert ditkit.FlowMatching(prediction="data").config.to_dict()["prediction"] == "data"
    with pytest.raises(ValueError, match="only apply to --objective flow"):
        ditkit.ObjectiveConfig(objective="gaussian", path="gvp")


# -- training, checkpoints and the one pipeline -----------------------------------------------

from ditkit.checkpoints import read_pt  # noqa: E402
from ditkit.cli import main  # noqa: E402
from ditkit.config import SampleConfig, TrainConfig  # noqa: E402
from ditkit.pipeline import load_pipeline  # noqa: E402
from ditkit.train import Trainer  # noqa: E402
from ditkit.utils.runs import latest_checkpoint  # noqa: E402

TINY = dict(model="DiT-S/2", depth=2, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, log_every=2)


def test_overfit_one_batch_with_flow():
    torch.manual_seed(0)
    model = ditkit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    flow = ditkit.FlowMatching(t_sampling="logit-normal")
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    y, noise = torch.arange(16) % 10, torch.randn(16, 1, 8, 8)
    t = flow.draw_t(16, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        loss = flow.training_losses(model.train(), x0, t, noise=noise, y=y)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_flow_run_records_its_objective_and_samples_without_flags(tmp_path, capsys):
    cfg = TrainConfig(**TINY, results_dir=str(tmp_path / "r"), objective="flow", path="gvp", t_sampling="logit-normal",
                      time_shift=2.0, global_batch_size=16, max_steps=2, ckpt_every=2, sample_every=2)  # fmt: skip
    exp = Trainer(cfg).run()
    ck = read_pt(latest_checkpoint(exp.parent))
    assert ck["objective"] == {"objective": "flow", "path": "gvp", "t_sampling": "logit-normal", "t_mean": 0.0, "t_std": 1.0,
                               "time_shift": 2.0, "time_scale": 1.0, "cos_loss": 0.0}  # fmt: skip
    assert (exp / "samples" / "0000002.png").exists()
    pipe = load_pipeline(SampleConfig(ckpt=str(exp / "model"), device="cpu"))
    assert isinstance(pipe.objective, ditkit.FlowMatching) and pipe.objective.path == "gvp" and pipe.objective.time_shift == 2.0
    assert ditkit.config.SAMPLER_OBJECTIVE[pipe.sampling.sampler] == "flow"
    assert main(["sample", "--ckpt", str(exp / "model"), "--num-samples", "2", "--out", str(tmp_path / "s")]) == 0
    assert pipe.sampling.sampler in capsys.readouterr().out  # the settings it used are printed
    # Resuming with another objective setting is refused (values at their defaults count as not
    # given: the run's own); a flag that contradicts the model is one sentence.
    with pytest.raises(ValueError, match=r"--time-shift 3.0 \(the run's: 2.0\)"):
        Trainer(TrainConfig(**{**cfg.__dict__, "time_shift": 3.0, "resume": "latest", "max_steps": 4}))
    for args, words in ((["--objective", "gaussian"], "records a flow model"), (["--sampler", "ddim"], "sampler ddim is for gaussian"),
                        (["--cfg-interval", "0.9", "0.1"], "LO <= HI"), (["--cfg-interval", "0.5", "1.5"], "at most 1")):  # fmt: skip
        assert main(["sample", "--ckpt", str(exp / "model"), "--out", str(tmp_path / "s"), *args]) == 2
        assert words in capsys.readouterr().err


def test_official_sit_checkpoint_samples_as_sit(tmp_path, sit_ref):
    """A raw SiT state dict (.pt, as SiT-XL-2-256x256.pt) with --objective flow: SiT's ODE defaults
    (dopri5, CFG 4 on three channels) unless told otherwise, and the settings reach the sampler
    that reproduces SiT's output (test_sit_samplers). A raw .pt has no head count: the fixture's 4
    heads at width 64 are saved at 1 head (64 per head, which is what the shapes suggest)."""
    meta, sit, io = sit_ref
    model = ditkit.DiT(**{**meta["config"], "num_heads": 1})
    model.load_state_dict(sit.state_dict())
    torch.save(model.state_dict(), tmp_path / "SiT-tiny.pt")
    from conftest import tiny_vae

    tiny_vae(tmp_path / "vae")
    opts = dict(ckpt=str(tmp_path / "SiT-tiny.pt"), objective="flow", vae=str(tmp_path / "vae"), device="cpu")
    pipe = load_pipeline(SampleConfig(**opts))
    assert (pipe.sampling.sampler, pipe.sampling.cfg_scale, pipe.sampling.cfg_channels) == ("dopri5", 4.0, 3)
    pipe = load_pipeline(SampleConfig(**opts, sampler="heun2", num_sampling_steps=5, cfg_scale=1.0))
    z = pipe.latents(io["linear.sample.y"], noise=io["linear.sample.z"])
    direct = ditkit.sample(model.eval(), ditkit.FlowMatching(), io["linear.sample.z"], io["linear.sample.y"], sampler="heun2", steps=5)
    assert rel(z, direct) == 0
    assert pipe.images(io["linear.sample.y"][:1], noise=io["linear.sample.z"][:1]).shape == (1, 3, 16, 16)
    gaussian = load_pipeline(SampleConfig(ckpt=str(tmp_path / "SiT-tiny.pt"), vae=str(tmp_path / "vae"), device="cpu"))
    assert isinstance(gaussian.objective, ditkit.GaussianDiffusion)  # official .pt files are DiT unless told otherwise
