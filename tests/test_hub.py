"""The diffusers / Hub formats both ways: export to a DiTPipeline folder that diffusers loads and
samples, import it (and the official facebook/DiT-XL-2-256 layout, by Hub id from the cache) back,
and the measured differences between DiTPipeline and ditkit on the same weights and noise."""

import json

import pytest
import torch
from conftest import rel, tiny_vae

import ditkit
from ditkit import cli
from ditkit.hub import diffusers_config, export_diffusers, scheduler, to_diffusers
from ditkit.config import Sampling
from ditkit.pipeline import Pipeline, decode
from ditkit.utils.runs import ASSETS

LABELS = [1, 3, 7]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on busy cores


def random_dit(**overrides) -> ditkit.DiT:
    """A tiny latent DiT with every weight random (DiT's init zeroes the gates and the output)."""
    torch.manual_seed(0)
    kw = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    model = ditkit.DiT(**{**kw, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(ditkit model, its DiTPipeline folder, the tiny VAE folder)."""
    root = tmp_path_factory.mktemp("hub")
    tiny_vae(root / "vae")
    model = random_dit()
    export_diffusers(model, root / "pipe", vae=str(root / "vae"), sampler="dpm++2m")
    return model, root / "pipe", root / "vae"


@pytest.fixture(scope="module")
def dit_pipeline(exported):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(exported[1])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_time_shift(transformer, shift: int) -> None:
    """diffusers' timestep embedding divides by half - shift (its DiT: 1; the official DiT: 0)."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def test_export_loads_in_diffusers_and_imports_back_exactly(exported, dit_pipeline):
    model, folder, _ = exported
    assert type(dit_pipeline.transformer).__name__ == "DiTTransformer2DModel"
    assert type(dit_pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert dit_pipeline.transformer.config.num_embeds_ada_norm == 1000  # DiTPipeline's null label is 1000
    assert len(json.loads((folder / "model_index.json").read_text())["id2label"]) == 10
    back = ditkit.DiT.from_pretrained(folder)
    assert back.config == model.config
    state, other = model.state_dict(), back.state_dict()
    assert set(state) == set(other) and all(torch.equal(state[k], other[k]) for k in state)


def test_weight_mapping_matches_diffusers_forward(exported, dit_pipeline):
    model, transformer = exported[0], dit_pipeline.transformer
    x, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 10, 500, 999])
    ours = model(x, t, torch.tensor([1, 5, 10, 10]))  # 10: the null label
    with torch.no_grad():
        set_time_shift(transformer, 0)
        same_time = transformer(x, timestep=t, class_labels=torch.tensor([1, 5, 1000, 500])).sample  # 500: padded with null
        set_time_shift(transformer, 1)
        stock = transformer(x, timestep=t, class_labels=torch.tensor([1, 5, 1000, 500])).sample
    assert rel(same_time, ours) < 1e-6  # the weights map exactly; only the timestep features differ
    assert 1e-3 < rel(stock, ours) < 5e-2  # measured 1.96e-2: diffusers' downscale_freq_shift=1


def _latents_of(dit_pipeline, **call):
    """Run DiTPipeline and return the latents it hands to the VAE (scaled as in training)."""
    seen = {}
    decode = dit_pipeline.vae.decode

    def spy(z, *args, **kwargs):
        seen["z"] = z * dit_pipeline.vae.config.scaling_factor
        return decode(z, *args, **kwargs)

    dit_pipeline.vae.decode = spy
    try:
        images = dit_pipeline(LABELS, generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    finally:
        dit_pipeline.vae.decode = decode
    return seen["z"], images


def test_pipelines_agree_on_the_same_noise(exported, dit_pipeline):
    """DiTPipeline draws its noise with randn from the generator, as ditkit does, so the same seed
    gives the same noise; with the same timestep features the two samplers agree to round-off."""
    model, _, _ = exported

    def ditkit_latents(sampler, cfg_channels=None):
        pipe = Pipeline(model=model, objective=ditkit.GaussianDiffusion(), sampling=Sampling(sampler, 10, 4.0, cfg_channels=cfg_channels),
                        vae=dit_pipeline.vae)  # fmt: skip
        return pipe.latents(torch.tensor(LABELS), generator=torch.Generator().manual_seed(0))

    ours = ditkit_latents("dpm++2m")
    ours_images = (decode(dit_pipeline.vae, ours) / 2 + 0.5).clamp(0, 1)  # DiTPipeline's output range
    dit_pipeline.scheduler = scheduler("dpm++2m")
    try:
        set_time_shift(dit_pipeline.transformer, 0)
        same_time, same_time_images = _latents_of(dit_pipeline, guidance_scale=4.0, num_inference_steps=10)
    finally:
        set_time_shift(dit_pipeline.transformer, 1)
    stock, _ = _latents_of(dit_pipeline, guidance_scale=4.0, num_inference_steps=10)
    assert rel(same_time, ours) < 1e-6 and rel(same_time_images, ours_images) < 1e-6
    assert 1e-3 < rel(stock, ours) < 3e-2  # measured 8.0e-3 (10 steps): the timestep features alone
    # DDIMScheduler has no respacing; its "trailing" spacing comes closest to ditkit's respaced DDIM.
    ddim = ditkit_latents("ddim")
    dit_pipeline.scheduler = scheduler("ddim")
    theirs_ddim, _ = _latents_of(dit_pipeline, guidance_scale=4.0, num_inference_steps=10)
    assert 1e-3 < rel(theirs_ddim, ddim) < 5e-2  # measured 9.1e-3 (4.9e-3 of it the scheduler, with diffusers' timestep features set to DiT's)
    # The official code guides 3 channels, DiTPipeline (and cfg_channels=None) all 4.
    official = ditkit_latents("dpm++2m", cfg_channels=3)
    assert 1e-3 < rel(official, ours) < 5e-2  # measured 7.2e-3
    dit_pipeline.scheduler = scheduler("dpm++2m")


def official_layout(folder, model: ditkit.DiT) -> None:
    """The layout of facebook/DiT-XL-2-256 (diffusers 0.12): a Transformer2DModel config without
    norm_eps, pickled .bin weights, id2label in model_index.json, a DDIMScheduler."""
    c = model.config
    (folder / "transformer").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    config = {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0", "cross_attention_dim": None,
              "num_vector_embeds": None, "only_cross_attention": False, "use_linear_projection": False, "norm_num_groups": 32,
              "activation_fn": "gelu-approximate", "attention_bias": True, "dropout": 0.0, "norm_elementwise_affine": False,
              "norm_type": "ada_norm_zero", "upcast_attention": False,
              **{k: v for k, v in diffusers_config(c, 1000).items() if k != "norm_eps"}}  # fmt: skip
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    torch.save(to_diffusers(model.state_dict(), c, 1000), folder / "transformer" / "diffusion_pytorch_model.bin")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "clip_sample": False,
        "num_train_timesteps": 1000, "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}))  # fmt: skip
    index = {"_class_name": "DiTPipeline", "_diffusers_version": "0.12.0.dev0", "id2label": {str(i): f"class {i}" for i in range(1000)},
             "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))


def test_official_hub_layout_by_hub_id(tmp_path, monkeypatch, capsys):
    """`DiT.from_pretrained("facebook/DiT-XL-2-256")` through huggingface_hub's cache (offline), and
    `ditkit export --format ditkit` of the same id; diffusers loads the same folder."""
    import huggingface_hub
    from diffusers import DiTPipeline

    model = random_dit(num_classes=1000)
    snapshot = tmp_path / "hub" / "models--facebook--DiT-XL-2-256" / "snapshots" / ("0" * 40)
    official_layout(snapshot, model)
    tiny_vae(snapshot / "vae")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    back = ditkit.DiT.from_pretrained("facebook/DiT-XL-2-256")
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert cli.main(["export", "--format", "ditkit", "--ckpt", "facebook/DiT-XL-2-256", "--out", str(tmp_path / "ditkit")]) == 0
    saved = json.loads((tmp_path / "ditkit" / "config.json").read_text())
    assert saved["num_classes"] == 1000 and saved["sampling"] == {"sampler": "ddim"}
    transformer = DiTPipeline.from_pretrained(snapshot).transformer  # diffusers remaps Transformer2DModel
    set_time_shift(transformer, 0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([4, 1000])
    with torch.no_grad():
        # The official config has no norm_eps, so diffusers' MLP LayerNorms take 1e-5 where DiT's take 1e-6.
        assert rel(transformer(x, timestep=t, class_labels=y).sample, back(x, t, y)) < 1e-3
    with pytest.raises(OSError, match="could not be fetched from the Hugging Face Hub"):
        ditkit.DiT.from_pretrained("facebook/DiT-XL-2-512")  # not in the cache, and offline


def test_save_pretrained_round_trip(tmp_path):
    model = random_dit(block="adaln", mlp_ratio=2.0)  # a DiT that diffusers cannot hold still saves
    folder = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    back = ditkit.DiT.from_pretrained(folder)
    assert back.config == model.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([2, 10])
    assert torch.equal(back(x, t, y), model(x, t, y))
    with pytest.raises(FileNotFoundError, match="neither a local checkpoint nor a Hub id"):
        ditkit.DiT.from_pretrained(tmp_path / "no" / "such" / "folder")


def test_export_cli(tmp_path, exported, capsys):
    model, _, vae = exported
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "pipe"
    assert cli.main(["export", "--ckpt", str(tmp_path / "src"), "--vae", str(vae), "--out", str(out), "--sampler", "unipc"]) == 0
    assert "DiTPipeline" in capsys.readouterr().out
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "UniPCMultistepScheduler"
    assert cli.main(["export", "--ckpt", str(tmp_path / "src"), "--vae", str(vae), "--out", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert cli.main(["export", "--ckpt", str(tmp_path / "src"), "--out", str(tmp_path / "novae")]) == 2
    assert "pass --vae" in capsys.readouterr().err and not (tmp_path / "novae").exists()
    random_dit(block="in_context", mlp="swiglu").save_pretrained(tmp_path / "modern")
    assert cli.main(["export", "--ckpt", str(tmp_path / "modern"), "--vae", str(vae), "--out", str(tmp_path / "x"), "--format", "diffusers"]) == 2
    assert "this model has block in_context, mlp swiglu, so export it with --format ditkit." in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))  # failed exports leave nothing behind


def test_export_pixel_model(tmp_path, capsys):
    """The bundled pixel-space diffusion model: DiTPipeline always decodes with a VAE, so transformer/
    and scheduler/ are written, with the model's own 10 classes, and come back exactly."""
    from diffusers import DiTTransformer2DModel

    assert cli.main(["export", "--ckpt", "fashion-mnist-diffusion", "--out", str(tmp_path / "fm")]) == 0
    assert "cannot decode it" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "fm").iterdir()) == ["ditkit.json", "scheduler", "transformer"]
    transformer = DiTTransformer2DModel.from_pretrained(tmp_path / "fm", subfolder="transformer")
    assert transformer.config.num_embeds_ada_norm == 10
    bundled, back = ditkit.DiT.from_pretrained(ASSETS / "fashion-mnist-diffusion"), ditkit.DiT.from_pretrained(tmp_path / "fm")
    assert back.config == bundled.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in bundled.state_dict().items())
