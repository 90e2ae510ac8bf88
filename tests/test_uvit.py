"""U-ViT against the official network: outputs in tests/reference/uvit/ (README there), strict
state-dict loads of every released configuration, the paper's sizes, and bad input."""

import json
import re
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ditkit import UViT, UViTConfig
from ditkit.config import UVIT_PRESETS

from conftest import REFERENCE, rel

UVIT_REF = REFERENCE / "uvit"
CONFIGS = json.loads((UVIT_REF / "uvit_configs.json").read_text())
MANIFEST = json.loads((UVIT_REF / "official_state_dict_manifest.json").read_text())


@pytest.fixture(scope="module")
def tensors():
    return load_file(UVIT_REF / "uvit_configs.safetensors")


def _prefixed(tensors: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def test_shared_fixture_loads_strict_and_matches():
    model = UViT(**json.loads((UVIT_REF / "uvit_tiny.json").read_text())).eval()
    model.load_state_dict(load_file(UVIT_REF / "uvit_tiny.safetensors"), strict=True)
    io = load_file(UVIT_REF / "uvit_tiny.io.safetensors")
    with torch.no_grad():
        out = model(io["x"], io["timesteps"], io["y"])
    assert rel(out, io["out"]) < 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_official_configs_match(tensors, name):
    model = UViT(**CONFIGS[name]).eval()
    model.load_state_dict(_prefixed(tensors, f"{name}.weights."), strict=True)
    with torch.no_grad():
        out = model(tensors[f"{name}.x"], tensors[f"{name}.timesteps"], tensors.get(f"{name}.y"))
    assert out.shape == tensors[f"{name}.x"].shape
    assert rel(out, tensors[f"{name}.out"]) < 1e-5


def test_long_skips_and_conv_change_the_output(tensors):
    """The fixtures could not tell the designs apart if skip_linear or the conv were ignored."""
    name = "latent_cond_noconv"
    model = UViT(**CONFIGS[name]).eval()
    model.load_state_dict(_prefixed(tensors, f"{name}.weights."), strict=True)
    args = tensors[f"{name}.x"], tensors[f"{name}.timesteps"], tensors[f"{name}.y"]
    with torch.no_grad():
        base = model(*args)
        model.out_blocks[0].skip_linear.weight.mul_(0.5)
        assert rel(model(*args), base) > 1e-3


def test_a_seed_gives_the_official_initialisation(tensors):
    torch.manual_seed(0)
    ours = UViT(**CONFIGS["latent_cond_noconv"]).state_dict()
    ref = _prefixed(tensors, "init_seed0.latent_cond_noconv.")
    assert ours.keys() == ref.keys()
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_released_state_dicts_match_official_keys_and_shapes(name):
    entry = MANIFEST[name]
    with torch.device("meta"):
        model = UViT(**entry["kwargs"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == entry["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == entry["params"]


# Each released checkpoint as a preset plus its data fields (the official configs/ folder).
RELEASED = {
    "cifar10_uvit_small": ("U-ViT-S/2", dict(img_size=32, num_classes=-1)),
    "celeba64_uvit_small": ("U-ViT-S/4", dict(img_size=64, num_classes=-1)),
    "imagenet64_uvit_mid": ("U-ViT-M/4", dict(img_size=64, num_classes=1000, class_dropout_prob=0.0)),
    "imagenet64_uvit_large": ("U-ViT-L/4", dict(img_size=64, num_classes=1000, class_dropout_prob=0.0)),
    "imagenet256_uvit_large": ("U-ViT-L/2", dict(img_size=32, in_chans=4, num_classes=1001)),
    "imagenet256_uvit_huge": ("U-ViT-H/2", dict(img_size=32, in_chans=4, num_classes=1001, conv=False)),
    "imagenet512_uvit_large": ("U-ViT-L/4", dict(img_size=64, in_chans=4, num_classes=1001)),
    "imagenet512_uvit_huge": ("U-ViT-H/4", dict(img_size=64, in_chans=4, num_classes=1001, conv=False)),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_are_the_released_configs(name):
    preset, data = RELEASED[name]
    config = asdict(UViTConfig.from_preset(preset, **data))
    for key, value in MANIFEST[name]["kwargs"].items():
        if key != "use_checkpoint":  # a memory switch of training, no part of the weights or outputs
            assert config[key] == value, key
    with torch.device("meta"):
        model = UViT.from_preset(preset, **data)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == MANIFEST[name]["state_dict"]


def test_preset_sizes_are_the_papers_table_1():
    """Layers and parameters (in millions, as Table 1 prints them) of the five sizes, each at a
    released setting: S and S-Deep at CIFAR-10's, M and L at ImageNet 64's, H at ImageNet 256's.
    Layers count the mid block: depth 12 is the paper's 13 layers."""
    cifar10, imagenet64 = dict(img_size=32), dict(img_size=64, num_classes=1000)
    paper = {
        "U-ViT-S/2": (cifar10, 13, 44), "U-ViT-S-Deep/2": (cifar10, 17, 58), "U-ViT-M/4": (imagenet64, 17, 131),
        "U-ViT-L/4": (imagenet64, 21, 287), "U-ViT-H/2": (dict(img_size=32, in_chans=4, num_classes=1001), 29, 501),
    }  # fmt: skip
    for preset, (data, layers, millions) in paper.items():
        with torch.device("meta"):
            model = UViT.from_preset(preset, **data)
        assert model.config.num_blocks == layers, preset
        assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions, preset
    assert len(UVIT_PRESETS) == 15 and "U-ViT-S-Deep/4" in UVIT_PRESETS


def test_labels_and_null_class():
    imagenet = UViTConfig.from_preset("U-ViT-H/2", img_size=32, in_chans=4, num_classes=1001, conv=False)
    assert (imagenet.null_class, imagenet.num_real_classes, imagenet.conditional) == (1000, 1000, True)
    no_dropout = UViTConfig(num_classes=1000, class_dropout_prob=0.0)
    assert (no_dropout.null_class, no_dropout.num_real_classes) == (None, 1000)
    for unconditional in (UViTConfig(num_classes=-1), UViTConfig(num_classes=0)):
        # one placeholder label, 0, which the pipeline does not pass to the network
        assert (unconditional.null_class, unconditional.num_real_classes, unconditional.conditional) == (None, 1, False)
    c = UViTConfig(img_size=32, in_chans=4)
    assert (c.input_size, c.in_channels, c.out_channels, c.learn_sigma) == (32, 4, 4, False)


def test_official_keywords_and_config_agree():
    kwargs = dict(img_size=16, patch_size=4, in_chans=2, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2, qkv_bias=True,
                  qk_scale=None, mlp_time_embed=True, num_classes=3, use_checkpoint=True, conv=False, skip=False)
    a, b = UViT(**kwargs, norm_layer=nn.LayerNorm), UViT(UViTConfig(**kwargs))
    assert a.config == b.config and a.grad_checkpointing
    with torch.device("meta"):
        assert UViT(UViTConfig(), img_size=32).config.img_size == 32


def test_gradient_checkpointing_gives_the_same_numbers():
    torch.manual_seed(0)
    model = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=4, num_heads=2, num_classes=5).train()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 4])
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-7)


def test_a_batch_equals_its_singles():
    torch.manual_seed(1)
    model = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2, num_classes=-1).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1.0, 250.5, 999.0])
    with torch.no_grad():
        batch = model(x, t)
        singles = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    assert rel(singles, batch) < 1e-6


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(img_size=30, patch_size=4), "not divisible by patch_size 4"),
        (dict(embed_dim=100, num_heads=12), "not divisible by num_heads 12"),
        (dict(num_classes=1), "leaves no real class"),
        (dict(depth=-2), "--depth must be 0 or more"),
        (dict(img_size=32.0), "--img-size must be a whole number"),
        (dict(conv=1), "--conv must be true or false"),
        (dict(qk_scale=0.0), "--qk-scale must be positive"),
        (dict(class_dropout_prob=1.0), "--class-dropout-prob must be less than 1"),
        (dict(mlp_ratio=0), "--mlp-ratio must be positive"),
        (dict(embed_dim=4, num_heads=1, mlp_ratio=0.1), "gives an MLP less than 1 wide"),
    ],
)
def test_bad_configs_are_refused_in_one_sentence(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        UViTConfig(**kwargs)


def test_bad_presets_and_layers_are_refused():
    with pytest.raises(ValueError, match="unknown U-ViT preset 'U-ViT-XL/2'"):
        UViTConfig.from_preset("U-ViT-XL/2")
    with pytest.raises(ValueError, match="unknown U-ViT preset 'DiT-S/2'"):
        UViT.from_preset("DiT-S/2")
    with pytest.raises(ValueError, match=r"unknown U-ViT config field\(s\) \['hidden_size'\]"):
        UViTConfig.from_preset("U-ViT-S/2", hidden_size=384)
    with pytest.raises(ValueError, match="norm_layer="):
        UViT(norm_layer=nn.RMSNorm)


def test_bad_inputs_are_refused_in_one_sentence():
    model = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2, num_classes=11).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 10])
    with pytest.raises(ValueError, match=r"takes 3-channel 8x8 inputs .* got shape \(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16), t, y)
    with pytest.raises(ValueError, match="class-conditional: pass labels y"):
        model(x, t)
    unconditional = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2).eval()
    with pytest.raises(ValueError, match="unconditional .* call it without labels"):
        unconditional(x, t, y)
