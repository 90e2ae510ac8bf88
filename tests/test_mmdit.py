"""MMDiT: joint attention, QK-norm, the SD3 conditioning, TextCondition through sample() and
guidance, gradient checkpointing, bf16, checkpoints and the flops count, on tiny configs."""

import pytest
import torch

import ditkit
from ditkit.checkpoints import load_model, save_pretrained
from ditkit.config import MMDiTConfig
from ditkit.flops import FLOPS_TEXT_TOKENS, measure
from ditkit.models.mmdit import MMDiT, TextCondition
from conftest import randomize_weights

CTX = 12  # text width of the tiny configs


def tiny(**kw) -> MMDiT:
    base = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, context_dim=CTX, pooled_dim=CTX)
    return MMDiT(**{**base, **kw})


def randomize(model, seed=0):
    return randomize_weights(model, seed, std=0.1)


def condition(n=3, length=5, seed=1, empty=True) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.arange(n) % length + 1
    mask = torch.arange(length)[None] < lengths[:, None]  # prompts of 1.. tokens
    null = TextCondition(torch.randn(1, 2, CTX, generator=g), torch.ones(1, 2, dtype=torch.bool), torch.randn(1, CTX, generator=g))
    return TextCondition(torch.randn(n, length, CTX, generator=g), mask, torch.randn(n, CTX, generator=g), null if empty else None)


def inputs(model, n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=g), torch.rand(n, generator=g) * 1000


def test_shapes_zero_init_and_gradients():
    model = tiny(learn_sigma=True)
    x, t = inputs(model)
    out = model(x, t, condition())
    assert out.shape == (3, 2, 8, 8) and torch.count_nonzero(out) == 0  # adaLN-Zero and a zero final layer
    flow = ditkit.FlowMatching()
    flow.training_losses(model.train(), x, torch.rand(3), cond=condition())["loss"].mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert not model.pos_embed.requires_grad
    # The last block's text stream only lends keys and values: it has no MLP or output projection.
    assert not hasattr(model.blocks[-1].context_block, "mlp") and hasattr(model.blocks[0].context_block, "mlp")


def test_text_reaches_the_image_and_padding_does_not():
    model = randomize(tiny())
    x, t = inputs(model)
    cond = condition()
    with torch.no_grad():
        out = model(x, t, cond)
        padded = model(x, t, cond.pad_to(9))  # masked zero tokens appended
        garbage = TextCondition(torch.where(cond.mask[..., None], cond.tokens, 50.0), cond.mask, cond.pooled)  # padding rewritten
        other_tokens = model(x, t, TextCondition(cond.tokens.flip(0), cond.mask, cond.pooled))
        other_pooled = model(x, t, TextCondition(cond.tokens, cond.mask, cond.pooled.flip(0)))
    assert torch.allclose(out, padded, atol=1e-5) and torch.allclose(out, model(x, t, garbage), atol=1e-5)
    assert (out[0] - other_tokens[0]).abs().max() > 1e-2  # joint attention: the tokens change the image
    assert (out[0] - other_pooled[0]).abs().max() > 1e-2  # adaLN: the pooled embedding does too


def test_qk_norm_makes_attention_scale_free():
    """RMSNorm on q and k: scaling the query and key weights of every stream changes nothing."""
    model = randomize(tiny())
    x, t = inputs(model)
    cond = condition()
    with torch.no_grad():
        before = model(x, t, cond)
        for block in model.blocks:
            for stream in (block.context_block, block.x_block):
                d = stream.qkv.out_features // 3
                stream.qkv.weight[: 2 * d] *= 100.0
                stream.qkv.bias[: 2 * d] *= 100.0
        after = model(x, t, cond)
    assert torch.allclose(before, after, rtol=1e-3, atol=1e-4)


def test_condition_rows_cat_and_null():
    cond = condition(n=4)
    both = TextCondition.cat([cond[:2], cond[2:].pad_to(7)])
    assert both.tokens.shape == (4, 7, CTX) and torch.equal(both.mask[:, :5], cond.mask) and not both.mask[:, 5:].any()
    null = cond.null()
    assert len(null) == 4 and torch.equal(null.pooled, cond.empty.pooled.expand(4, -1)) and null.tokens.shape[1] == 2
    with pytest.raises(ValueError, match="no empty-prompt encoding"):
        condition(empty=False).null()


@pytest.mark.parametrize("sampler", ["euler", "heun2", "sde-euler"])
def test_guided_batch_equals_singles(sampler):
    """Guidance with the empty prompt runs [cond; null] in one batch: N prompts equal N singles."""
    model = randomize(tiny())
    flow = ditkit.FlowMatching()
    cond = condition()
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    run = lambda zz, cc: ditkit.sample(model, flow, zz, cc, sampler=sampler, steps=4, cfg_scale=3.0,  # noqa: E731
                                       generator=torch.Generator().manual_seed(4))  # fmt: skip
    batch = run(z, cond)
    if sampler.startswith("sde"):  # per-step noise differs between a batch and singles
        assert batch.shape == z.shape and torch.isfinite(batch).all()
        return
    singles = torch.cat([run(z[i : i + 1], cond[i : i + 1]) for i in range(3)])
    assert torch.allclose(batch, singles, atol=1e-4)
    unguided = ditkit.sample(model, flow, z, cond, sampler=sampler, steps=4)
    manual_null = ditkit.sample(model, flow, z, cond.null(), sampler=sampler, steps=4)
    # Guidance moves the samples, and the null row is what the empty prompt gives.
    assert (batch - unguided).abs().max() > 1e-3 and (unguided - manual_null).abs().max() > 1e-3


def test_class_ids_and_prompts_go_to_their_own_models():
    flow = ditkit.FlowMatching()
    with pytest.raises(ValueError, match="text-to-image model: it takes prompts"):
        ditkit.sample(tiny(), flow, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), steps=2)
    dit = ditkit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="class-conditional model: it takes class ids"):
        ditkit.sample(dit, flow, torch.randn(3, 1, 8, 8), condition(), steps=2)
    with pytest.raises(ValueError, match="got 2 noises but 3 prompts"):
        ditkit.sample(tiny(), flow, torch.randn(2, 1, 8, 8), condition(), steps=2)


def test_grad_checkpointing_and_bf16():
    model = randomize(tiny()).train()
    x, t = inputs(model)
    cond = condition()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.grad_checkpointing = checkpointing
        model(x, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, cond)
    full = model(x, t, cond).detach()
    assert low.dtype == torch.bfloat16 and ((low.float() - full).norm() / full.norm()) < 0.05


def test_overfit_two_prompts():
    """Two prompts, two images: the flow loss of a tiny MMDiT falls to a fifth in 150 steps."""
    torch.manual_seed(0)
    model = tiny(hidden_size=48, num_heads=4).train()
    flow = ditkit.FlowMatching(t_sampling="logit-normal", time_scale=1000.0)
    data = torch.stack([torch.ones(1, 8, 8), -torch.ones(1, 8, 8)]).repeat(4, 1, 1, 1)  # (8, 1, 8, 8)
    cond = condition(n=2).pad_to(5)
    cond = TextCondition.cat([cond] * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = flow.training_losses(model, data, flow.draw_t(8, g), noise=torch.randn(data.shape, generator=g), cond=cond)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:10]) / 10
    out = ditkit.sample(model, flow, torch.randn(2, 1, 8, 8, generator=g), cond[:2], sampler="heun2", steps=10)
    assert out[0].mean() > 0.5 and out[1].mean() < -0.5  # each prompt gives its own image


def test_save_load_round_trip(tmp_path):
    model = randomize(tiny())
    folder = save_pretrained(model, model.config, tmp_path / "m", extra={"text_encoder": {"name": "x", "max_length": 8}})
    loaded = load_model(folder)
    assert isinstance(loaded, MMDiT) and loaded.config == model.config
    x, t = inputs(model)
    assert torch.equal(loaded(x, t, condition()), model(x, t, condition()))


def test_presets_and_flops():
    c = MMDiTConfig.from_preset("MMDiT-S/2", input_size=32, in_channels=4)
    assert (c.depth, c.hidden_size, c.num_heads, c.patch_size) == (12, 384, 6, 2)
    with pytest.raises(ValueError, match="unknown preset"):
        MMDiTConfig.from_preset("MMDiT-Q/2")
    cost = measure(c, "MMDiT-S/2")
    D, T, L = 384, 256, FLOPS_TEXT_TOKENS
    # Per block: the linears of both streams (qkv, proj, 4x MLP) on their tokens, QK^T and AV over
    # all L + T tokens; the last block's text stream has only its qkv and asks no queries.
    full = 12 * D * D * (T + L) + 2 * (T + L) ** 2 * D
    last = 12 * D * D * T + 3 * D * D * L + 2 * T * (T + L) * D
    embed = 4 * D * 4 * T + 384 * D * L  # patch embedding (p*p*C -> D per token), context projection
    final = D * 2 * 2 * 4 * T
    expected = 11 * full + last + embed + final
    assert abs(cost.macs - expected) / expected < 0.01, (cost.macs, expected)
