"""Parameter and multiply-add counts against the paper, and the four block designs' behaviour."""

import functools
import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ditkit.cli import main
from ditkit.flops import PAPER_BLOCK_GFLOPS, PAPER_GFLOPS, count_macs, measure, measure_preset
from ditkit.models import BLOCKS, PRESETS, DiT, DiTConfig
from ditkit.utils.runs import ASSETS, BUNDLED
from conftest import REFERENCE

MANIFEST = REFERENCE / "official" / "official_state_dict_manifest.json"
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


@functools.cache
def cost(name: str, block: str = "adaln_zero", input_size: int = 32):
    return measure_preset(name, block=block, input_size=input_size)


def expected_macs(c: DiTConfig) -> int:
    """Multiply-adds written out by hand: linears, patch conv, and attention's QK^T and AV."""
    D, F, L, T = c.hidden_size, int(c.hidden_size * c.mlp_ratio), c.depth, (c.input_size // c.patch_size) ** 2
    patch_in, patch_out = c.patch_size**2 * c.in_channels, c.patch_size**2 * c.out_channels
    S = T + 2 if c.block == "in_context" else T  # sequence length inside the blocks
    block = S * (4 * D * D + 2 * D * F) + 2 * S * S * D  # qkv + proj + mlp, then QK^T + AV
    block += {"adaln_zero": 6 * D * D, "adaln": 4 * D * D, "in_context": 0}.get(c.block, 0)
    if c.block == "cross_attn":  # q and out projections on T tokens, k/v on the 2 condition tokens
        block += 2 * T * D * D + 2 * (2 * D * D) + 2 * T * 2 * D
    final = T * D * patch_out + (2 * D * D if c.block.startswith("adaln") else 0)
    return T * D * patch_in + (256 * D + D * D) + L * block + final


@pytest.mark.parametrize("name", PRESETS)
def test_preset_gflops_match_table1(name):
    # Table 1 prints two decimals: 0.36 stands for [0.355, 0.365), hence abs (S/8 counts 0.358).
    assert cost(name).gflops == pytest.approx(PAPER_GFLOPS[name], rel=5e-3, abs=5e-3)
    assert cost(name).paper_gflops == PAPER_GFLOPS[name]


@pytest.mark.parametrize("block", BLOCKS)
def test_block_designs_match_figure5(block):
    assert cost("DiT-XL/2", block).gflops == pytest.approx(PAPER_BLOCK_GFLOPS[block], rel=5e-3)


def test_cross_attention_costs_about_15_percent_more():  # the paper's words in section 3.2
    ratio = cost("DiT-XL/2", "cross_attn").gflops / cost("DiT-XL/2").gflops
    assert 1.14 < ratio < 1.17


def test_params_equal_official_manifest():
    manifest = json.loads(MANIFEST.read_text())
    assert len(manifest) == 13
    for key, entry in manifest.items():
        name, _, pixels = key.partition("@")
        c = cost(name, input_size=int(pixels) // 8)
        assert (c.params, c.trainable_params) == (entry["params"], entry["trainable_params"]), key


@pytest.mark.parametrize("name", ["DiT-S/8", "DiT-XL/2"])
@pytest.mark.parametrize("block", BLOCKS)
def test_count_equals_hand_formula(name, block):
    """Exact, so attention (the 2*S*S*D term) and every linear must be in the count."""
    assert cost(name, block).macs == expected_macs(DiTConfig.from_preset(name, block=block))


@pytest.mark.parametrize("block", BLOCKS)
def test_real_cpu_model_counts_like_meta(block):
    """On CPU tensors SDPA runs a kernel torch has no formula for; ours must fill the gap."""
    config = DiTConfig(**TINY, block=block)
    model = DiT(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model) == measure(config).macs == expected_macs(config)
    assert count_macs(model, batch_size=3) == 3 * expected_macs(config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("block", BLOCKS)
def test_forward_shape(block, learn_sigma):
    torch.manual_seed(0)
    model = DiT(DiTConfig(**TINY, block=block, learn_sigma=learn_sigma))
    for p in model.parameters():  # move off the zero init so every path contributes
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([1.0, 500.0, 999.0]), torch.tensor([0, 3, 10]))
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_adaln_zero_starts_at_zero_and_learns():
    torch.manual_seed(0)
    model = DiT(DiTConfig(**TINY))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.tensor([1, 2])
    out = model(x, t, y)
    assert torch.equal(out, torch.zeros_like(out))

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn_like(out)
    grads = []
    for _ in range(3):
        opt.zero_grad()
        ((model(x, t, y) - target) ** 2).mean().backward()
        grads.append({k: p.grad.abs().sum().item() for k, p in model.named_parameters() if p.requires_grad})
        opt.step()
    # Step 0: the zero output layer holds back every other gradient, so only it learns.
    assert grads[0]["final_layer.linear.weight"] > 0
    assert all(v == 0 for k, v in grads[0].items() if not k.startswith("final_layer.linear"))
    # Step 1: the zero modulation layers (gates, final shift/scale) learn next; their inputs still don't.
    assert grads[1]["blocks.0.adaLN_modulation.1.weight"] > 0
    assert grads[1]["final_layer.adaLN_modulation.1.weight"] > 0
    assert grads[1]["blocks.0.attn.qkv.weight"] == 0 and grads[1]["t_embedder.mlp.0.weight"] == 0
    # Step 2: every trainable parameter has a gradient.
    assert [k for k, v in grads[2].items() if v == 0] == []


def test_in_context_drops_its_two_tokens():
    model = DiT(DiTConfig(**TINY, block="in_context"))
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.update(block=out.shape))
    model.final_layer.register_forward_hook(lambda m, args, out: seen.update(final_in=args[0].shape))
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    assert seen["block"] == (2, 16 + 2, 32)
    assert seen["final_in"] == (2, 16, 32)
    assert out.shape == (2, 8, 8, 8)


def test_cli_json(capsys):
    assert main(["flops", "--json", "--model", "DiT-S/8", "DiT-XL/2", "--block", "adaln_zero", "in_context"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["block"]) for r in rows] == [
        ("DiT-S/8", "adaln_zero"), ("DiT-S/8", "in_context"), ("DiT-XL/2", "adaln_zero"), ("DiT-XL/2", "in_context"),
    ]  # fmt: skip
    for r in rows:
        assert {"model", "params", "gflops", "block", "input_size", "patch_size", "tokens"} <= set(r)
    assert rows[0]["params"] == 33148160 and rows[0]["tokens"] == 16 and rows[0]["input_size"] == 32
    assert rows[2]["gflops"] == pytest.approx(118.64, rel=5e-3)
    assert rows[1]["paper_gflops"] is None and rows[3]["paper_gflops"] == 119.4


def test_cli_table_and_pixel_models(capsys):
    assert main(["flops", "--model", "DiT-S/8", "--in-channels", "1", "--image-size", "32", "--num-classes", "10"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["model", "block"] and len(table) == 2
    assert table[1].split()[:8] == ["DiT-S/8", "adaln_zero", "32x32x1", "8", "12", "384", "6", "16"]
    assert table[1].split()[-1] == "-"  # the paper reports no figure for this config


def test_cli_table_prints_the_papers_figures_like_its_own(capsys):
    assert main(["flops", "--model", "DiT-L/4", "DiT-XL/2", "--block", "adaln_zero", "in_context"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[-1] for r in rows] == ["19.70", "-", "118.64", "119.40"]  # Table 1 and Figure 5, two decimals
    assert all(re.fullmatch(r"\d+\.\d\d", r[-2]) for r in rows)


def test_cli_block_aliases(capsys):
    assert main(["flops", "--json", "--model", "DiT-S/8", "--block", "adaLN-Zero", "adaLN", "cross-attention", "in-context"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["block"] for r in rows] == ["adaln_zero", "adaln", "cross_attn", "in_context"]
    assert [r["macs"] for r in rows] == [cost("DiT-S/8", b).macs for b in BLOCKS]


def test_cli_counts_any_model(capsys):
    """Model flags resize a preset; the result is no longer the paper's config, so no paper figure."""
    assert main(["flops", "--json", "--model", "DiT-S/2", "--depth", "3", "--hidden-size", "96", "--num-heads", "3", "--patch-size", "4"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    config = DiTConfig.from_preset("DiT-S/2", depth=3, hidden_size=96, num_heads=3, patch_size=4)
    assert (row["model"], row["depth"], row["hidden_size"], row["num_heads"], row["patch_size"]) == ("custom", 3, 96, 3, 4)
    assert row["macs"] == expected_macs(config) and row["params"] == measure(config).params and row["paper_gflops"] is None
    for modern in (dict(mlp="swiglu"), dict(norm="rmsnorm"), dict(qk_norm=True), dict(pos_embed="rope")):  # not the paper's blocks
        assert measure(DiTConfig.from_preset("DiT-S/8", **modern)).model == "custom"
    assert measure(DiTConfig.from_preset("DiT-S/8", input_size=8, in_channels=1, num_classes=3, block="adaln")).model == "DiT-S/8"


def test_cli_counts_a_checkpoint(tmp_path, capsys):
    """--ckpt bundled (or a bundled model by name), a .pt or a model folder: the model it holds (and
    flags on top of it)."""
    assert main(["flops", "--json", "--ckpt", "bundled"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["params"] == sum(t.numel() for t in load_file(str(BUNDLED / "model.safetensors")).values()) == 1_877_900
    old = ASSETS / "fashion-mnist-diffusion"  # the paper's blocks, which expected_macs counts
    config = DiTConfig(**{k: v for k, v in json.loads((old / "config.json").read_text()).items() if k in DiTConfig.__dataclass_fields__})
    assert main(["flops", "--json", "--ckpt", "fashion-mnist-diffusion"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["params"] == sum(t.numel() for t in load_file(str(old / "model.safetensors")).values()) == 5_515_808
    assert row["macs"] == expected_macs(config) and row["tokens"] == 64 and row["model"] == "custom"
    assert main(["flops", "--json", "--ckpt", "fashion-mnist-diffusion", "--patch-size", "2", "--block", "adaLN"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["macs"] == expected_macs(replace(config, patch_size=2, block="adaln")) and row["tokens"] == 256

    model = DiT(DiTConfig(**TINY))
    torch.save(model.state_dict(), tmp_path / "tiny.pt")  # official layout: the config is read off the shapes
    assert main(["flops", "--json", "--ckpt", str(tmp_path / "tiny.pt")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["macs"] == expected_macs(DiTConfig(**TINY))
    assert main(["flops", "--ckpt", "bundled", "--model", "DiT-S/2"]) == 2
    assert "drop --model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "DiT-Q/2"], "--model is 'DiT-Q/2', not one of"),
        (["--block", "film"], "--block is 'film', not one of"),
        (["--image-size", "100"], "not divisible"),
        (["--model", "DiT-S/4", "--input-size", "30"], "not divisible"),
    ],
)
def test_cli_bad_input(capsys, argv, words):
    assert main(["flops", *argv]) == 2
    assert words in capsys.readouterr().err
