"""The diffusers and Hugging Face Hub formats, both ways.

Export: a DiT -> a diffusers folder, `transformer/` (DiTTransformer2DModel), `scheduler/`, `vae/` and
`model_index.json`, that `diffusers.DiTPipeline.from_pretrained(OUT)` loads. Import: such a folder,
a lone DiTTransformer2DModel folder, or the official `facebook/DiT-XL-2-*` layout (a
`Transformer2DModel` config and `.bin` weights) -> a ditkit Checkpoint. Any of them, a ditkit folder
or an official .pt may be named by a Hub id, fetched while online (`DiT.from_pretrained`).

Where DiTPipeline and ditkit differ with the same weights (measured in tests/test_hub.py):
- diffusers' timestep embedding divides its frequency exponent by half - 1 (`downscale_freq_shift=1`),
  the official DiT's by half: the same weights see slightly different timestep features;
- DiTPipeline guides every latent channel (ditkit's cfg_channels=None), the official code the first 3;
- DiTPipeline drops the learned-variance channels before its scheduler, so ditkit's DDPM with the
  learned variance has no DiTPipeline counterpart; its DDIMScheduler steps from t to t - 1000 // N
  where ditkit's DDIM steps to the previous respaced timestep; DPM-Solver++ and UniPC are the same
  diffusers schedulers with the same settings in both;
- DiTPipeline's null label is 1000 (ImageNet's), so a latent model with fewer classes is written with
  its label table padded to 1000 rows by the null row (ids past its classes sample unconditionally);
  `model_index.json`'s id2label keeps the real number of classes for the way back. A pixel-space
  model, which DiTPipeline cannot decode (it always runs a VAE), is written as transformer/ and
  scheduler/ with its own class count.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import DiTConfig, MMDiTConfig, field_default
from .models import DiT
from .models.layers import get_2d_sincos_pos_embed
from .objectives import GaussianDiffusion
from .samplers.gaussian import multistep_scheduler
from .utils.io import read_json, read_pt
from .utils.runs import bundled_model, check_official_download
from .utils.vae import load_vae

DIFFUSERS_NULL_LABEL = 1000  # DiTPipeline's null class, hard-coded there
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# DiTConfig fields whose paper values (their defaults) DiTTransformer2DModel has built in.
PAPER_DESIGN = ("block", "mlp_ratio", "mlp", "norm", "qk_norm", "pos_embed", "mlp_conv")
DIT_LAYERNORM_EPS = 1e-6  # the official DiT's LayerNorms (diffusers' default norm_eps is 1e-5)
# What DiT.from_pretrained fetches of a Hub repository: a ditkit folder, or a diffusers one's transformer.
HUB_FILES = ["config.json", "model.safetensors", "model_index.json", "ditkit.json", "scheduler/scheduler_config.json",
             "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]  # fmt: skip
HUB_PT_FILES = ["*.pt", "transformer/diffusion_pytorch_model.bin"]  # fetched only where no safetensors are
# Beside model_index.json: what ditkit records of the model ("objective", "sampling") and diffusers has no place for.
DITKIT_RECORD = "ditkit.json"


def _linear(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]


def _pairs(depth: int) -> list[tuple[str, str]]:
    """(ditkit key, diffusers key) of every tensor that is copied as it is."""
    pairs = _linear("x_embedder.proj", "pos_embed.proj") + _linear("final_layer.adaLN_modulation.1", "proj_out_1")
    pairs += _linear("final_layer.linear", "proj_out_2")
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        pairs += _linear(f"{b}.adaLN_modulation.1", f"{d}.norm1.linear") + _linear(f"{b}.attn.proj", f"{d}.attn1.to_out.0")
        pairs += _linear(f"{b}.mlp.fc1", f"{d}.ff.net.0.proj") + _linear(f"{b}.mlp.fc2", f"{d}.ff.net.2")
    return pairs


# diffusers keeps a copy of the timestep and label embedders in every block; a DiT has one of each.
EMBEDDERS = _linear("t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_1") + _linear("t_embedder.mlp.2", "norm1.emb.timestep_embedder.linear_2")
LABEL_TABLE = ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight")


def diffusers_obstacle(c, objective: str = "gaussian") -> str | None:
    """Why a model with config `c` and this objective cannot be written as a diffusers DiT (None if
    it can): the words before ", so export it with --format ditkit"."""
    if not isinstance(c, DiTConfig):
        return "diffusers has no pipeline for ditkit's text-to-image MMDiT" if isinstance(c, MMDiTConfig) else "DiTPipeline runs DiTs, and this is a U-ViT"
    if objective != "gaussian":
        return f"DiTPipeline samples diffusion models, and this is a {objective} model"
    differs = [f"{name} {getattr(c, name)}" for name in PAPER_DESIGN if getattr(c, name) != field_default(DiTConfig, name)]
    if differs:
        return (f"DiTTransformer2DModel holds the paper's DiT only (adaLN-Zero blocks, 4x GELU MLPs, LayerNorm, sin-cos positions), "
                f"and this model has {', '.join(differs)}")  # fmt: skip
    if c.cfg_embed:
        return "DiTTransformer2DModel has no guidance-scale input, which this guidance-distilled model needs"
    if c.in_channels not in (1, 3) and c.num_classes > DIFFUSERS_NULL_LABEL:
        return f"DiTPipeline takes label {DIFFUSERS_NULL_LABEL} as its null label, and this model has {c.num_classes} classes"
    return None


def diffusers_config(c: DiTConfig, embeds: int) -> dict:
    """DiTTransformer2DModel's config of a DiT (the paper's design only) with a label table of
    `embeds` classes + the null row: DIFFUSERS_NULL_LABEL for a DiTPipeline, else the model's classes."""
    if any(getattr(c, name) != field_default(DiTConfig, name) for name in PAPER_DESIGN):
        raise ValueError(f"{diffusers_obstacle(c)}, so export it with --format ditkit.")
    return dict(num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
                out_channels=c.out_channels, num_layers=c.depth, sample_size=c.input_size, patch_size=c.patch_size,
                num_embeds_ada_norm=embeds, norm_eps=DIT_LAYERNORM_EPS)  # fmt: skip


def to_diffusers(state: dict[str, torch.Tensor], c: DiTConfig, embeds: int) -> dict[str, torch.Tensor]:
    """A DiT state dict -> DiTTransformer2DModel's (config: `diffusers_config(c, embeds)`)."""
    out = {theirs: state[ours] for ours, theirs in _pairs(c.depth)}
    table = state[LABEL_TABLE[0]]  # (num_classes [+ 1 null], D)
    # Rows past the classes, index `embeds` (the null label) included, hold the null row; zeros if there is none.
    null = table[c.num_classes] if table.shape[0] > c.num_classes else torch.zeros_like(table[0])
    padded = torch.cat([table[: c.num_classes], null.expand(embeds + 1 - c.num_classes, -1)])  # (embeds + 1, D)
    for i in range(c.depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            for name, part in zip(("to_q", "to_k", "to_v"), state[f"{b}.attn.qkv.{kind}"].chunk(3)):
                out[f"{d}.attn1.{name}.{kind}"] = part
        for ours, theirs in EMBEDDERS:
            out[f"{d}.{theirs}"] = state[ours]
        out[f"{d}.{LABEL_TABLE[1]}"] = padded
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers(dconfig: dict, state: dict[str, torch.Tensor], num_classes: int | None = None) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """DiTTransformer2DModel's config and state dict -> (DiTConfig, DiT state dict). `num_classes`
    (id2label's length) trims the label table that export padded to DiTPipeline's 1000 classes."""
    name = dconfig.get("_class_name")
    if name not in DIFFUSERS_CLASSES or dconfig.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or dconfig.get("patch_size") is None:
        raise ValueError(f"this diffusers model is a {name} with norm_type {dconfig.get('norm_type')!r}, not a DiT; point at a DiTPipeline folder or its transformer/.")
    if dconfig.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ValueError(f"this DiTTransformer2DModel uses {dconfig['activation_fn']}, but a DiT's MLP uses tanh-approximated GELU; it cannot be converted.")
    heads, depth = dconfig["num_attention_heads"], dconfig["num_layers"]
    hidden, cin = heads * dconfig["attention_head_dim"], dconfig["in_channels"]
    cout = dconfig.get("out_channels") or cin
    if cout not in (cin, 2 * cin):
        raise ValueError(f"this DiTTransformer2DModel maps {cin} channels to {cout}; a DiT outputs {cin} or {2 * cin} (with the variance).")
    embeds = dconfig["num_embeds_ada_norm"]
    n = num_classes or embeds
    for i in range(1, depth):  # a DiT has one timestep and label embedder: diffusers' per-block copies must agree
        for _, theirs in EMBEDDERS + [LABEL_TABLE]:
            if not torch.equal(state[f"transformer_blocks.{i}.{theirs}"], state[f"transformer_blocks.0.{theirs}"]):
                raise ValueError(f"block {i} of this DiTTransformer2DModel has its own {theirs.split('.')[2]}, which a DiT (one shared embedder) cannot hold.")
    config = DiTConfig(
        input_size=dconfig["sample_size"], patch_size=dconfig["patch_size"], in_channels=cin, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / hidden,
        class_dropout_prob=0.1, num_classes=n, learn_sigma=cout == 2 * cin,
    )  # fmt: skip  (diffusers' label table always has the null row, so the DiT has label dropout)
    out = {ours: state[theirs] for ours, theirs in _pairs(depth)}
    for ours, theirs in EMBEDDERS:
        out[ours] = state[f"transformer_blocks.0.{theirs}"]
    table = state[f"transformer_blocks.0.{LABEL_TABLE[1]}"]  # (embeds + 1, D), null last
    out[LABEL_TABLE[0]] = torch.cat([table[:n], table[embeds:]])
    for i in range(depth):
        d = f"transformer_blocks.{i}.attn1"
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([state[f"{d}.{name}.{kind}"] for name in ("to_q", "to_k", "to_v")])
    # diffusers recomputes the fixed sin-cos embedding; a DiT stores it as a frozen parameter.
    grid = get_2d_sincos_pos_embed(hidden, config.input_size // config.patch_size)
    out["pos_embed"] = torch.from_numpy(grid).float()[None]  # (1, T, D)
    return config, out


def scheduler(sampler: str):
    """The diffusers scheduler of one of DIFFUSERS_SAMPLERS over the paper's diffusion: dpm++2m and
    unipc exactly as ditkit runs them. DDIMScheduler has no respacing: of its timestep spacings,
    "trailing" (steps of 1000 // N ending at t = 1000 // N - 1) is the closest to ditkit's DDIM
    (tests/test_hub.py measures it), "linspace" takes the official timesteps but steps to t - 1000 // N."""
    from diffusers import DDIMScheduler

    diffusion = GaussianDiffusion()
    if sampler == "ddim":
        return DDIMScheduler(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas, clip_sample=False,
                             set_alpha_to_one=True, timestep_spacing="trailing")  # fmt: skip
    return multistep_scheduler(sampler, diffusion)


def fresh_folder(out: Path):
    """A temporary folder beside `out`, renamed onto it by the caller once complete."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; pass a new --out folder (nothing was written).")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))


def finish_folder(tmp: Path, out: Path) -> Path:
    if out.exists():
        out.rmdir()  # empty (checked by fresh_folder)
    os.replace(tmp, out)
    return out


def export_diffusers(model: DiT, out: str | Path, vae: str | None = None, sampler: str = "ddim", record: dict | None = None) -> Path:
    """Write `model` as a diffusers folder. A latent model gets a full DiTPipeline (its VAE copied from
    `vae`); a pixel model, which DiTPipeline cannot decode, gets transformer/ and scheduler/ only.
    `record` ({"objective", "sampling"}: what ditkit records of the model) goes into ditkit.json,
    which read_diffusers reads back."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    c, out = model.config, Path(out)
    obstacle = diffusers_obstacle(c)
    if obstacle:
        raise ValueError(f"{obstacle}, so export it with --format ditkit.")
    latent = c.in_channels not in (1, 3)
    embeds = DIFFUSERS_NULL_LABEL if latent else c.num_classes
    transformer = DiTTransformer2DModel(**diffusers_config(c, embeds))
    transformer.load_state_dict(to_diffusers(model.state_dict(), c, embeds), strict=True)
    if latent and vae is None:
        raise ValueError(f"DiTPipeline decodes its samples with the VAE, and this is a latent model ({c.in_channels} channels); pass --vae with its AutoencoderKL folder or hub id.")
    autoencoder = load_vae(vae, torch.device("cpu")) if latent else None
    if autoencoder is not None and autoencoder.config.latent_channels != c.in_channels:
        raise ValueError(f"the VAE makes {autoencoder.config.latent_channels}-channel latents but the model takes {c.in_channels}; pass the VAE the model was trained with.")
    tmp = fresh_folder(out)
    try:
        if latent:
            DiTPipeline(transformer=transformer, vae=autoencoder, scheduler=scheduler(sampler)).save_pretrained(tmp)
            # DiTPipeline reads id2label from model_index.json (as on the Hub) but does not write it; it keeps the class count.
            index = json.loads((tmp / "model_index.json").read_text())
            index["id2label"] = {str(i): str(i) for i in range(c.num_classes)}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        else:
            transformer.save_pretrained(tmp / "transformer")
            scheduler(sampler).save_pretrained(tmp / "scheduler")
        if record:
            (tmp / DITKIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return finish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_diffusers(path: Path) -> bool:
    """A DiTPipeline folder, or a folder holding one (transformer/) or a DiTTransformer2DModel."""
    if not path.is_dir():
        return False
    if (path / "model_index.json").exists() or (path / "transformer" / "config.json").exists():
        return True
    try:  # a config.json that is not a diffusers model's (not even JSON) is for read_checkpoint to refuse
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and config.get("_class_name") in DIFFUSERS_CLASSES


_SAMPLER_OF_SCHEDULER = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm++2m", "UniPCMultistepScheduler": "unipc"}


def read_diffusers(path: str | Path) -> tuple[DiTConfig, dict[str, torch.Tensor], dict]:
    """A diffusers DiT folder as ditkit's (config, state dict, what it records): weights converted;
    the objective and sampling settings of ditkit.json (ditkit's export), with the scheduler's sampler."""
    path = Path(path)
    index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").exists() else {}
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    dconfig = json.loads((folder / "config.json").read_text())
    weights = next((folder / w for w in DIFFUSERS_WEIGHTS if (folder / w).exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} holds no {' or '.join(DIFFUSERS_WEIGHTS)}; check that the download finished.")
    state = load_file(str(weights)) if weights.suffix == ".safetensors" else read_pt(weights)
    labels = index.get("id2label")
    config, state = from_diffusers(dconfig, state, num_classes=len(labels) if labels else None)
    meta: dict = read_json(path / DITKIT_RECORD) if (path / DITKIT_RECORD).exists() else {"objective": {"objective": "gaussian"}}
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    if isinstance(meta, dict) and scheduler_file.exists():
        sampler = _SAMPLER_OF_SCHEDULER.get(json.loads(scheduler_file.read_text()).get("_class_name"))
        if sampler is not None:  # the scheduler the folder holds, whatever ditkit.json says
            meta["sampling"] = {**(meta.get("sampling") if isinstance(meta.get("sampling"), dict) else {}), "sampler": sampler}
    return config, state, meta


def resolve(name: str | os.PathLike) -> Path:
    """A local path as it is; otherwise a Hub id (owner/name), fetched into the Hugging Face cache
    (only the files a DiT needs; works offline once cached)."""
    path = Path(name)
    if path.exists():
        return path
    if bundled_model(str(name)) is not None:
        return bundled_model(str(name))
    check_official_download(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(name))
    except Exception:
        raise FileNotFoundError(f"{name} is neither a local checkpoint nor a Hub id (owner/name); check the path.") from None
    try:
        folder = Path(snapshot_download(str(name), allow_patterns=HUB_FILES))
        if not any((folder / f).exists() for f in ("model.safetensors", "transformer/diffusion_pytorch_model.safetensors")):
            folder = Path(snapshot_download(str(name), allow_patterns=HUB_PT_FILES))
    except Exception as e:
        raise OSError(f"{name} is not a local path and could not be fetched from the Hugging Face Hub ({type(e).__name__}); "
                      "check the id and the network, or pass a local folder.") from None  # fmt: skip
    return folder
