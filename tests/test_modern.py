"""Options of the modern DiT (SwiGLU, RMSNorm, QK-norm, 2-D RoPE) and the training options
(cosine loss term, lr schedules, EMA schedules, gradient clipping): each does what it says, and
the defaults leave the paper's model untouched (test_equivalence)."""

import math

import pytest
import torch

import ditkit
from ditkit.checkpoints import load_model, read_pt
from ditkit.config import TrainConfig
from ditkit.flops import measure
from ditkit.models.layers import SwiGLU, apply_rope_2d, rope_2d
from ditkit.train import Trainer
from ditkit.train.schedule import ema_decay, learning_rate
from ditkit.utils.runs import latest_checkpoint

SMALL = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g) * 999, torch.arange(n) % 10


def randomised(model, seed=1):
    """Every parameter random (the init zeros adaLN-Zero's gates and the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_defaults_are_the_paper():
    c = ditkit.DiTConfig()
    assert (c.mlp, c.norm, c.qk_norm, c.pos_embed, c.mlp_conv) == ("gelu", "layernorm", False, "sincos", False)


def test_swiglu_forward_and_size():
    m = randomised(ditkit.DiT(**SMALL, mlp="swiglu"))
    block = m.blocks[0]
    assert isinstance(block.mlp, SwiGLU) and block.mlp.w12.out_features == 2 * int(2 * 64 * 4 / 3)
    x = torch.randn(2, 5, 64)
    a, b = (x @ block.mlp.w12.weight.T + block.mlp.w12.bias).chunk(2, -1)
    torch.testing.assert_close(block.mlp(x), (torch.nn.functional.silu(a) * b) @ block.mlp.w3.weight.T + block.mlp.w3.bias)
    gelu = ditkit.DiT(**SMALL)
    n = lambda model: sum(p.numel() for p in model.blocks[0].mlp.parameters())  # noqa: E731
    assert abs(n(m) / n(gelu) - 1) < 0.01  # 2/3 of the width keeps the parameters
    assert abs(measure(m.config).macs / measure(gelu.config).macs - 1) < 0.01  # and the multiply-adds (ditkit flops)


def test_rmsnorm_normalises_without_centring():
    m = ditkit.DiT(**SMALL, norm="rmsnorm")
    norm = m.blocks[0].norm1
    x = torch.randn(2, 5, 64) + 3.0
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    assert not hasattr(norm, "weight") or norm.weight is None  # adaLN supplies scale and shift


def test_qk_norm_makes_attention_blind_to_query_key_scale():
    x, t, y = inputs()
    for qk_norm in (True, False):
        m = randomised(ditkit.DiT(**SMALL, qk_norm=qk_norm))
        before = m(x, t, y)
        with torch.no_grad():
            for blk in m.blocks:  # scale the query and key projections of every head by 5
                blk.attn.qkv.weight[: 2 * 64] *= 5
                blk.attn.qkv.bias[: 2 * 64] *= 5
        after = m(x, t, y)
        assert torch.allclose(before, after, atol=1e-5) == qk_norm


def test_rope_depends_only_on_relative_position():
    cos, sin = rope_2d(4, 16)  # 4x4 grid, head width 16
    q, k = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    same = torch.randn(1, 16)
    q[0, 0, :] = same  # the same vector at every position
    k[0, 0, :] = same
    rq, rk = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
    dots = (rq[0, 0] @ rk[0, 0].T)  # (16, 16): position i against position j
    pos = lambda i: divmod(i, 4)  # noqa: E731  (row, col), row-major as PatchEmbed flattens
    a, b = (0 * 4 + 0, 1 * 4 + 2), (2 * 4 + 1, 3 * 4 + 3)  # both pairs are 1 row, 2 columns apart
    assert pos(a[1])[0] - pos(a[0])[0] == pos(b[1])[0] - pos(b[0])[0]
    torch.testing.assert_close(dots[a], dots[b])
    assert not torch.allclose(dots[0, 1], dots[0, 4])  # one column apart is not one row apart
    torch.testing.assert_close(apply_rope_2d(q, cos, sin).norm(dim=-1), q.norm(dim=-1))  # a rotation


@pytest.mark.parametrize("pos_embed", ["rope", "sincos+rope"])
def test_rope_models(pos_embed):
    m = randomised(ditkit.DiT(**SMALL, pos_embed=pos_embed))
    assert hasattr(m, "pos_embed") == (pos_embed == "sincos+rope") and "rope_cos" not in m.state_dict()
    x, t, y = inputs()
    out = m(x, t, y)
    sincos_only = ditkit.DiT(**SMALL)
    sincos_only.load_state_dict(m.state_dict(), strict=False)
    assert not torch.allclose(out, randomised(sincos_only)(x, t, y))
    with pytest.raises(ValueError, match="in_context"):
        ditkit.DiT(**SMALL, pos_embed="rope", block="in_context")
    with pytest.raises(ValueError, match="divisible by 4"):
        ditkit.DiTConfig(**{**SMALL, "hidden_size": 24, "num_heads": 4}, pos_embed="rope")


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_mlp_conv_starts_as_the_plain_block_and_mixes_only_grid_neighbours(mlp):
    plain = randomised(ditkit.DiT(**SMALL, mlp=mlp))
    conv = ditkit.DiT(**SMALL, mlp=mlp, mlp_conv=True).eval()
    missing = conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".mlp.conv." in k for k in missing)  # plain weights load; the convs keep their zero init
    x, t, y = inputs()
    torch.testing.assert_close(conv(x, t, y), plain(x, t, y))  # zero-initialised: the plain model exactly
    loss = conv(x, t, y).square().mean()
    loss.backward()
    assert conv.blocks[0].mlp.conv.conv.weight.grad.abs().sum() > 0  # and it learns from the first step
    assert 1 < measure(conv.config).macs / measure(plain.config).macs < 1.1  # ditkit flops counts it: 9 multiply-adds a channel

    # Trained, a token's MLP output depends on its 3x3 neighbourhood of the 4x4 token grid only.
    mlp_module = randomised(conv).blocks[0].mlp
    h = torch.randn(1, 16, 64)
    bumped = h.clone()
    bumped[0, 5] += 1.0  # row 1, column 1
    changed = (mlp_module(bumped) - mlp_module(h)).abs().sum(-1)[0] > 1e-6  # (16,)
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    assert torch.equal(changed, ((rows - 1).abs() <= 1) & ((cols - 1).abs() <= 1))

    with pytest.raises(ValueError, match="in_context"):
        ditkit.DiT(**SMALL, mlp_conv=True, block="in_context")
    with pytest.raises(ValueError, match="clip"):
        ditkit.VideoDiTConfig.from_preset("VDiT-S/4x2", mlp_conv=True)
    with pytest.raises(ValueError, match="MMDiT"):
        TrainConfig(model="MMDiT-S/4", data_path="fashion-mnist-captions", objective="flow", mlp_conv=True)


def test_cosine_loss_term():
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.rand(4, generator=g)
    m = randomised(ditkit.DiT(**SMALL))
    y = torch.zeros(4, dtype=torch.long)
    plain = ditkit.FlowMatching().training_losses(m, data, t, noise=noise, y=y)
    terms = ditkit.FlowMatching(cos_loss=0.5).training_losses(m, data, t, noise=noise, y=y)
    v = m(ditkit.FlowMatching().interpolate(data, noise, t)[0], t, y)[:, :1]
    u = data - noise
    cos = (v * u).flatten(1).sum(1) / (v.flatten(1).norm(dim=1) * u.flatten(1).norm(dim=1))
    torch.testing.assert_close(terms["cos"], 1 - cos)
    torch.testing.assert_close(terms["loss"], plain["loss"] + 0.5 * (1 - cos))


def test_learning_rate_schedules():
    cfg = lambda **kw: TrainConfig(lr=1e-3, warmup_steps=10, **kw)  # noqa: E731
    assert learning_rate(cfg(), 0, 100) == pytest.approx(1e-4) and learning_rate(cfg(), 9, 100) == pytest.approx(1e-3)
    assert learning_rate(cfg(), 99, 100) == 1e-3  # constant after warm-up, the paper's
    cos = cfg(lr_schedule="cosine", min_lr=1e-5)
    assert learning_rate(cos, 10, 100) == pytest.approx(1e-3) and learning_rate(cos, 99, 100) == pytest.approx(1e-5)
    assert learning_rate(cos, 10 + 89 // 2, 100) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    lin = cfg(lr_schedule="linear")
    assert learning_rate(lin, 99, 100) == 0 and learning_rate(lin, 10 + 89 // 2, 100) == pytest.approx(1e-3 * (1 - 44 / 89))


def test_ema_schedules():
    assert ema_decay(TrainConfig(ema_decay=0.999), 5) == 0.999
    warm = TrainConfig(ema_decay=0.999, ema_schedule="warmup")
    assert ema_decay(warm, 1) == pytest.approx(2 / 11) and ema_decay(warm, 100_000) == 0.999
    power = TrainConfig(ema_schedule="power", ema_gamma=6.94)
    assert ema_decay(power, 1) == 0.0  # the first average is the weights themselves
    assert ema_decay(power, 1000) == pytest.approx((1 - 1 / 1000) ** 7.94)
    # The power EMA's average weight sits at a fixed fraction of the run: (gamma + 1) / (gamma + 2).
    steps = 2000
    weights, decay_after = [], 1.0
    for s in range(steps, 0, -1):
        weights.append((1 - ema_decay(power, s)) * decay_after)
        decay_after *= ema_decay(power, s)
    centre = sum(w * s for w, s in zip(weights, range(steps, 0, -1))) / sum(weights)
    assert centre / steps == pytest.approx(7.94 / 8.94, rel=0.01)


def test_gradient_clipping_and_options_recorded(tmp_path):
    cfg = TrainConfig(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0,
                      results_dir=str(tmp_path), global_batch_size=16, max_steps=2, ckpt_every=2, grad_clip=1e-3,
                      objective="flow", t_sampling="logit-normal", cos_loss=0.1, mlp="swiglu", norm="rmsnorm",
                      qk_norm=True, pos_embed="rope", lr_schedule="cosine", ema_schedule="power")  # fmt: skip
    trainer = Trainer(cfg)
    loader, _ = trainer.loader()
    x, y = next(iter(loader))
    trainer.train_step(x, y)
    norm = torch.norm(torch.stack([p.grad.norm() for p in trainer.params]))
    assert norm <= 1e-3 * 1.0001
    exp = trainer.run()
    ck = read_pt(latest_checkpoint(exp.parent))
    assert ck["args"]["grad_clip"] == 1e-3 and ck["args"]["lr_schedule"] == "cosine" and ck["objective"]["cos_loss"] == 0.1
    model = load_model(exp / "model")
    c = model.config
    assert (c.mlp, c.norm, c.qk_norm, c.pos_embed) == ("swiglu", "rmsnorm", True, "rope")


def test_time_budget_and_recorded_sampling(tmp_path):
    """--max-minutes stops (with a checkpoint) once the time is up; the default_* settings are what
    the model folder records for `ditkit sample`."""
    import json

    cfg = TrainConfig(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, results_dir=str(tmp_path),
                      global_batch_size=16, max_steps=1000, max_minutes=1e-9, objective="flow", default_sampler="euler",
                      default_steps=7, default_cfg_scale=2.5, default_cfg_interval=(0.25, 1.0))  # fmt: skip
    trainer = Trainer(cfg)
    exp = trainer.run()
    assert trainer.step == 1 and read_pt(latest_checkpoint(exp.parent))["step"] == 1
    recorded = json.loads((exp / "model" / "config.json").read_text())["sampling"]
    assert recorded == {"sampler": "euler", "num_sampling_steps": 7, "cfg_scale": 2.5, "cfg_interval": [0.25, 1.0]}
    with pytest.raises(ValueError, match="does not sample flow models"):
        TrainConfig(objective="flow", default_sampler="ddim")


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_half_precision_training_attention_is_the_math_form_and_agrees_with_sdpa(masked):
    """A bf16 CPU backward over few keys takes the math form (PyTorch's CPU flash kernel is slow
    there); its output and gradients match SDPA's to bf16 round-off, with a padding mask too."""
    import torch.nn.functional as F

    from ditkit.models.layers import CPU_MATH_ATTENTION_MAX_KEYS, attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 16, 8, generator=g) for _ in range(3))
    mask = torch.ones(3, 1, 1, 16, dtype=torch.bool)
    mask[0, ..., 10:] = False  # the first prompt's last 6 keys are padding
    mask = mask if masked else None
    grad = torch.randn(3, 2, 16, 8, generator=g)

    def run(fn, dtype):
        leaves = [a.to(dtype).requires_grad_() for a in (q, k, v)]
        out = fn(*leaves, mask) if fn is attention else fn(*leaves, attn_mask=mask)
        out.backward(grad.to(dtype))
        return out, [a.grad.float() for a in leaves]

    def sdpa_in_graph(out) -> bool:
        seen, todo = set(), [out.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if "ScaledDotProduct" in type(fn).__name__:
                return True
            todo += [f for f, _ in fn.next_functions]
        return False

    out, grads = run(attention, torch.bfloat16)
    assert not sdpa_in_graph(out)
    ref, ref_grads = run(F.scaled_dot_product_attention, torch.float32)
    assert (out.float() - ref).norm() / ref.norm() < 2e-2
    for a, b in zip(grads, ref_grads):
        assert (a - b).norm() / b.norm() < 3e-2
    # fp32, inference and long sequences keep SDPA (exactly the official numerics)
    sdpa, _ = run(attention, torch.float32)
    assert sdpa_in_graph(sdpa)
    torch.testing.assert_close(sdpa, ref, rtol=0, atol=0)
    with torch.no_grad():
        assert attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).grad_fn is None
    long = torch.randn(1, 1, CPU_MATH_ATTENTION_MAX_KEYS + 1, 8, dtype=torch.bfloat16, requires_grad=True)
    assert sdpa_in_graph(attention(long, long, long))


def test_auto_precision_is_bf16_only_where_its_matmuls_are_fast(monkeypatch, tmp_path):
    from ditkit.utils.devices import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert resolve_precision("auto", cpu) == expected
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probes: fp32, the safe side
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    trainer = Trainer(TrainConfig(model="DiT-S/4", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0,
                                  global_batch_size=8, max_steps=1, precision="auto", results_dir=str(tmp_path)))  # fmt: skip
    assert trainer.precision == "bf16"
    x = torch.zeros(2, 1, 8, 8)
    with trainer.autocast():
        assert trainer.model(x, torch.zeros(2), torch.zeros(2, dtype=torch.long)).dtype == torch.bfloat16


def test_fit_to_minutes_anneals_a_run_the_clock_ends(tmp_path):
    """--fit-to-minutes ends the cosine where the clock stops the run: with a --max-steps far past
    what the time holds, the last step's learning rate is near --min-lr with it and near --lr
    without it. It is refused without a time budget or a decaying schedule."""
    import csv

    from ditkit.train.schedule import fitted_total

    assert fitted_total(100, 20.0, (50, 10.0), 1.0, 10_000) == 100 + 5 * 40  # 5 steps/s for the 40 s left
    assert fitted_total(100, 20.0, (50, 10.0), 1.0, 150) == 150 and fitted_total(100, 70.0, (50, 10.0), 1.0, 1e9) == 101
    lrs = {}
    for fit in (False, True):
        cfg = TrainConfig(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, results_dir=str(tmp_path / str(fit)),
                          global_batch_size=8, max_steps=10**6, max_minutes=0.1, fit_to_minutes=fit, lr=1e-3, min_lr=0.0, warmup_steps=0,
                          lr_schedule="cosine", log_every=5, ckpt_every=10**6, objective="flow")  # fmt: skip
        exp = Trainer(cfg).run()
        rows = list(csv.reader((exp / "log.csv").open()))
        lrs[fit] = float(rows[-1][3])
    assert lrs[False] > 0.99e-3 and lrs[True] < 0.1e-3, lrs
    for bad in (dict(max_minutes=None), dict(lr_schedule="constant")):
        with pytest.raises(ValueError, match="--fit-to-minutes fits a decaying learning rate"):
            TrainConfig(**{"max_minutes": 5.0, "lr_schedule": "cosine", "fit_to_minutes": True, **bad})
