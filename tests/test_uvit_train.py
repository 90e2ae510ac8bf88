"""U-ViT everywhere a DiT goes: training (both objectives, the loss falls, bitwise resume), the model
folder, sample / sample-npz / export / flops / LoRA through the command line, official .pth files
sampled through the pipeline as the official code samples them, and bad input in one sentence."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REFERENCE, rel, tiny_vae
from safetensors.torch import load_file

import ditkit
from ditkit import UViT, UViTConfig
from ditkit import checkpoints as ck_module
from ditkit.checkpoints import load_model, read_checkpoint
from ditkit.cli import main
from ditkit.config import SampleConfig, TrainConfig
from ditkit.flops import measure
from ditkit.lora import resolve_targets
from ditkit.objectives import FlowMatching, GaussianDiffusion, VPDiffusion
from ditkit.pipeline import load_pipeline
from ditkit.train import Trainer
from ditkit.utils.io import read_pt
from ditkit.utils.runs import latest_checkpoint

UVIT_REF = REFERENCE / "uvit"
TINY = ["--data-path", "digits", "--model", "U-ViT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
        "--global-batch-size", "16", "--num-workers", "0", "--log-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny U-ViT trained 2 steps on digits by `ditkit train` (the paper's diffusion)."""
    results = tmp_path_factory.mktemp("uvit") / "results"
    assert main(["train", *TINY, "--max-steps", "2", "--results-dir", str(results)]) == 0
    return results / "000-U-ViT-S-2"


@pytest.mark.parametrize("objective", [GaussianDiffusion(learn_sigma=False), FlowMatching(), VPDiffusion()])
def test_a_few_steps_lower_the_loss(objective):
    torch.manual_seed(0)
    model = UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=2, num_heads=4, num_classes=11)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    y, noise = torch.arange(16) % 10, torch.randn(16, 1, 8, 8)
    t = objective.draw_t(16, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(80):
        loss = objective.training_losses(model.train(), x0, t, noise=noise, y=y)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2.5


def test_trainer_builds_the_uvit_and_resumes_bitwise(tmp_path):
    """6 steps straight equal 3, then a bare resume to 6 (flow matching, label dropout on)."""
    common = dict(model="U-ViT-S/4", depth=2, hidden_size=32, num_heads=2, data_path="digits", num_workers=0, global_batch_size=512,
                  ckpt_every=3, log_every=1, objective="flow")  # fmt: skip
    straight = Trainer(TrainConfig(**common, max_steps=6, results_dir=str(tmp_path / "a"))).run()
    Trainer(TrainConfig(**common, max_steps=3, results_dir=str(tmp_path / "b"))).run()
    resumed = Trainer(TrainConfig(results_dir=str(tmp_path / "b"), resume="latest", max_steps=6)).run()
    a, b = read_pt(latest_checkpoint(straight.parent)), read_pt(latest_checkpoint(resumed.parent))
    assert b["step"] == 6
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    c = UViTConfig(**a["model_config"])  # the null row on top of digits' 10 classes; conv on for pixels
    assert (c.num_classes, c.null_class, c.num_real_classes, c.conv, c.patch_size) == (11, 10, 10, True, 4)
    assert not torch.equal(a["model"]["label_emb.weight"], read_pt(latest_checkpoint(straight.parent).parent / "0000003.pt")["model"]["label_emb.weight"])


def test_model_folder_samples_exports_and_counts(trained, tmp_path, capsys):
    model = UViT.from_pretrained(trained / "model")
    assert isinstance(model, ditkit.models.UViT) and model.config.embed_dim == 32 and not model.training
    assert main(["sample", "--ckpt", str(trained / "model"), "--num-sampling-steps", "2", "--classes", "3", "7", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists()
    assert main(["sample-npz", "--ckpt", str(trained / "model"), "--num-sampling-steps", "2", "--num-samples", "6", "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as data:
        assert data["arr_0"].shape == (6, 8, 8, 1) and data["labels"].max() < 10  # real classes only, never the null row
    checkpoint = latest_checkpoint(trained.parent)
    assert main(["export", "--format", "ditkit", "--ckpt", str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    exported = UViT.from_pretrained(tmp_path / "exported")
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["objective"] == {"objective": "gaussian"}
    capsys.readouterr()
    assert main(["flops", "--ckpt", str(trained / "model"), "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)[0]
    assert counted["params"] == sum(p.numel() for p in model.parameters()) and counted["block"] == "long-skips"


def test_serve_a_uvit(trained):
    pytest.importorskip("uvicorn", reason="ditkit serve needs its extra (pip install 'ditkit[serve]')")
    from test_serve import post, serving

    with serving(load_pipeline(SampleConfig(ckpt=str(trained / "model"), device="cpu"))) as client:
        info = client.get("/api/info").json()
        assert info["num_classes"] == 10 and info["model"].startswith("a custom U-ViT") and "dpm-solver++" in info["samplers"]
        assert post(client, {"classes": [3], "num_samples": 2, "seed": 1, "num_sampling_steps": 2}).status_code == 200
        refused = post(client, {"classes": [10], "num_sampling_steps": 2})  # the null row is not a class to ask for
        assert refused.status_code == 400 and "class id 10 is outside [0, 10)" in refused.text


def test_lora_on_a_uvit(trained, tmp_path):
    model = UViT.from_pretrained(trained / "model")
    assert resolve_targets(model) == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]  # the DiT's names; no adaLN
    results = tmp_path / "lora"
    assert main(["train", "--init-from", str(trained / "model"), "--lora-rank", "2", "--max-steps", "2", "--data-path", "digits",
                 "--global-batch-size", "16", "--num-workers", "0", "--results-dir", str(results)]) == 0  # fmt: skip
    adapter = results / "000-lora" / "adapter"
    assert main(["sample", "--lora", str(adapter), "--num-sampling-steps", "2", "--classes", "1", "--out", str(tmp_path / "l.png")]) == 0


def test_uvit_flops_count_every_matmul():
    """Parameters as the official releases (the paper's Table 1), multiply-adds as counted by hand."""
    c = UViTConfig(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=11)
    d, p, L = 32, 2, 16
    T = L + 2  # label and time tokens
    block = T * (3 * d * d + d * d + 2 * 4 * d * d) + 2 * T * T * d  # qkv, proj, MLP; QK^T and AV
    expected = 3 * block + T * 2 * d * d + L * p * p * 3 * d + T * d * p * p * 3 + 8 * 8 * 3 * 3 * 9  # + skip, patches, decoder, conv
    assert measure(c).macs == expected
    h2 = measure(UViTConfig.from_preset("U-ViT-H/2", img_size=32, in_chans=4, num_classes=1001, conv=False))
    assert round(h2.params / 1e6, 1) == 500.8 and h2.depth == 29 and h2.model == "U-ViT-H/2"


def _official_pth(tmp_path, name: str, monkeypatch) -> str:
    """A raw state dict saved as the official releases are (torch.save of nnet.state_dict()). Head
    counts are not in the weights: a release's come from the paper's sizes, where this width joins them."""
    kwargs = json.loads((UVIT_REF / "uvit_configs.json").read_text())[name]
    monkeypatch.setitem(ck_module.UVIT_SIZES, "tiny", (kwargs["depth"], kwargs["embed_dim"], kwargs["num_heads"]))
    tensors = load_file(UVIT_REF / "uvit_sampling.safetensors")
    prefix = f"weights.{name}."
    path = tmp_path / f"{name}.pth"
    torch.save({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}, path)
    return str(path), tensors


def test_official_unconditional_pth_samples_through_the_pipeline(tmp_path, monkeypatch):
    """An unconditional U-ViT (CIFAR-10's kind): the VP SDE with DPM-Solver-fast, labels not passed on."""
    path, ref = _official_pth(tmp_path, "uncond", monkeypatch)
    pipe = load_pipeline(SampleConfig(ckpt=path, num_sampling_steps=10))
    assert isinstance(pipe.objective, VPDiffusion) and pipe.sampling.sampler == "dpm-solver" and pipe.sampling.cfg_channels is None
    assert pipe.config.num_real_classes == 1 and not pipe.config.conditional
    out = pipe.latents(torch.zeros(len(ref["vp.uncond.z"]), dtype=torch.long), noise=ref["vp.uncond.z"])
    assert rel(out, ref["vp.uncond.dpm_fast10.out"].clamp(-1, 1)) < 1e-5  # a pixel model: clipped to [-1, 1]
    assert main(["sample", "--ckpt", path, "--num-sampling-steps", "4", "--num-samples", "2", "--out", str(tmp_path / "u.png")]) == 0
    assert main(["sample", "--ckpt", path, "--num-sampling-steps", "4", "--cfg-scale", "2", "--out", str(tmp_path / "v.png")]) == 2


def test_official_latent_pth_samples_as_uvit_h(tmp_path, monkeypatch):
    """U-ViT-H's way, recorded for its release: SD betas, the network at k + 1, DPM-Solver++ 'fast',
    the official scale 0.4 as cfg_scale 1.4 on every channel, the null class the last row."""
    path, ref = _official_pth(tmp_path, "latent_cond_noconv", monkeypatch)
    c = read_checkpoint(path).config or ck_module.infer_config(read_checkpoint(path).state)
    assert (c.null_class, c.num_real_classes, c.conv) == (10, 10, False)
    huge = next(v for k, v in ck_module.UVIT_RELEASES.items() if k[2] == 1152 and k[0] == 32)
    monkeypatch.setitem(ck_module.UVIT_RELEASES, (c.img_size, c.in_chans, c.embed_dim, c.depth), huge)
    tiny_vae(tmp_path / "vae", levels=2)
    pipe = load_pipeline(SampleConfig(ckpt=path, vae=str(tmp_path / "vae"), num_sampling_steps=10))
    assert (pipe.sampling.sampler, pipe.sampling.cfg_scale, pipe.objective.schedule, pipe.objective.time_offset) == ("dpm-solver++", 1.4, "scaled-linear", 1)
    out = pipe.latents(ref["discrete.y"], noise=ref["discrete.z"])
    assert rel(out, ref["discrete.dpmpp_fast10.scale0.4.out"]) < 2e-6


def test_bad_input_is_one_sentence(trained, tmp_path, capsys):
    uvit_ck = read_checkpoint(trained / "model")
    with pytest.raises(ValueError, match=r"holds a custom U-ViT .*, not a DiT; pass a U-ViT preset as --model"):
        load_model(uvit_ck, ditkit.DiTConfig(input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=32, num_heads=2))
    dit = ditkit.DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    dit.save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match=r"holds a custom DiT .*, not a U-ViT; pass a DiT preset as --model"):
        load_model(read_checkpoint(tmp_path / "dit"), uvit_ck.config)
    with pytest.raises(ValueError, match="not a U-ViT; load it with ditkit.DiT.from_pretrained"):
        UViT.from_pretrained(tmp_path / "dit")
    cases = [
        (["--ckpt", str(trained / "model"), "--model", "DiT-S/2"], "holds a U-ViT, not DiT-S/2; drop --model or pick a U-ViT preset."),
        (["--ckpt", str(tmp_path / "dit"), "--model", "U-ViT-S/2"], "holds a DiT, not U-ViT-S/2; drop --model or pick a DiT preset."),
        (["--ckpt", str(trained / "model"), "--image-size", "16"], "this pixel-space model makes 8px images, not 16px; use --image-size 8."),
        (["--ckpt", str(trained / "model"), "--classes", "10"], "class id 10 is outside [0, 10); pass class ids from 0 to 9."),
        (["--ckpt", str(tmp_path / "imagenet256_uvit_huge.pth")], "imagenet256_uvit_huge.pth does not exist: the official U-ViT ImageNet 256 U-ViT-H/2 is downloaded once from the U-ViT release"),
        (["--ckpt", str(trained / "model"), "--vae", str(tmp_path / "autoencoder_kl_ema.pth")], "is U-ViT's own copy of Stable Diffusion's kl-f8 autoencoder"),
    ]
    (tmp_path / "autoencoder_kl_ema.pth").write_bytes(b"x")
    for args, message in cases:
        assert main(["sample", *args, "--num-sampling-steps", "2", "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # The image size its learned positions fit: a preset at another size does not load, and the network refuses other inputs.
    assert main(["sample", "--ckpt", str(trained / "model"), "--model", "U-ViT-S/2", "--image-size", "16", "--out", str(tmp_path / "x.png")]) == 2
    assert "shape mismatches (" in capsys.readouterr().err
    # A null class it lacks: trained without label dropout, it cannot be guided.
    no_null = replace(uvit_ck.config, num_classes=10, class_dropout_prob=0.0)
    ck_module.save_pretrained(UViT(no_null), no_null, tmp_path / "nonull")
    assert main(["sample", "--ckpt", str(tmp_path / "nonull"), "--cfg-scale", "2", "--num-sampling-steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "trained without label dropout, so it has no null class to guide with; use --cfg-scale 1." in capsys.readouterr().err
    assert main(["train", *TINY, "--mlp", "swiglu", "--max-steps", "1", "--results-dir", str(tmp_path / "r")]) == 2
    assert "--mlp swiglu shape a DiT's blocks; U-ViT-S/2 is the official U-ViT" in capsys.readouterr().err
