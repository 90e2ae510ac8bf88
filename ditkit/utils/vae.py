"""The VAE of latent models: diffusers' AutoencoderKL from a folder, the hub's cache or the hub, found
and checked (config.json first) before any weights load; decoding latents to images."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

VAE_SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
# A hub id is ORG/NAME; anything else (or an ORG/NAME folder that exists) is a local folder.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class VaeSource:
    """Where an AutoencoderKL comes from, found before any weights are read: a local folder, the
    hub's local cache, or the hub itself; `config` is its config.json."""

    name: str  # folder path or hub id
    config: dict
    local_only: bool  # a folder or the hub cache: load with no network access


def _quietly(fn, repo: str, **kwargs):
    """A diffusers loading call without huggingface_hub's deprecation warnings (it passes old arguments)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
        return fn(repo, **kwargs)


def find_vae(name: str) -> VaeSource:
    """The VAE `name` stands for ('ema'/'mse' shorthands, a folder, a hub id) with its config, in one
    sentence when it is not there: a missing folder is named as such, an unreachable hub is said
    once (no retries), so the image size and channels can be checked before any weights load."""
    from diffusers import AutoencoderKL

    repo = VAE_SHORTHANDS.get(name, name)
    folder = Path(repo).expanduser()
    if folder.is_file() and folder.name.startswith("autoencoder_kl"):
        raise ValueError(f"--vae {folder} is U-ViT's own copy of Stable Diffusion's kl-f8 autoencoder, which ditkit does not read; pass a diffusers "
                         "AutoencoderKL folder of that VAE instead (stabilityai/sd-vae-ft-ema, saved on a machine that is online).")  # fmt: skip
    if folder.is_file():
        raise ValueError(f"--vae {folder} is a file; pass the AutoencoderKL folder that holds config.json and the weights.")
    if folder.is_dir() or not HUB_ID.match(repo):
        if not folder.is_dir():
            raise ValueError(f"VAE folder {folder} does not exist; pass --vae with an AutoencoderKL folder (config.json + weights), a hub id (ORG/NAME) or ema / mse.")
        if not (folder / "config.json").is_file():
            raise ValueError(f"VAE folder {folder} has no config.json; pass a folder written by AutoencoderKL.save_pretrained.")
        return VaeSource(str(folder), AutoencoderKL.load_config(folder), local_only=True)
    try:  # downloaded before: the hub cache, with no network access
        return VaeSource(repo, _quietly(AutoencoderKL.load_config, repo, local_files_only=True), local_only=True)
    except OSError:
        pass
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError

    try:  # one request, no retries: an offline machine answers at once
        get_hf_file_metadata(hf_hub_url(repo, "config.json"))
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise ValueError(f"the Hugging Face hub has no AutoencoderKL {repo!r} (and there is no folder of that name); check the id or pass a local folder.") from None
    except Exception as e:
        raise ValueError(
            f"cannot reach the Hugging Face hub for VAE {repo!r} ({type(e).__name__}), and it is not in the local cache or a folder of "
            f"that name; download it where you are online (huggingface-cli download {repo} --local-dir DIR) and pass --vae DIR."
        ) from None
    return VaeSource(repo, _quietly(AutoencoderKL.load_config, repo), local_only=False)


def load_vae(vae: str | VaeSource, device: torch.device | str = "cpu"):
    """diffusers' AutoencoderKL from a local folder or a hub id (the local cache first), in eval mode."""
    from diffusers import AutoencoderKL
    from diffusers.utils import is_accelerate_available

    source = vae if isinstance(vae, VaeSource) else find_vae(vae)
    try:
        model = _quietly(AutoencoderKL.from_pretrained, source.name, local_files_only=source.local_only,
                          low_cpu_mem_usage=is_accelerate_available())  # fmt: skip
    except Exception as e:
        raise ValueError(f"cannot load the VAE weights from {source.name!r} ({type(e).__name__}); pass --vae with a complete AutoencoderKL folder (config.json + weights).") from None
    return model.to(device).eval()


def vae_factor(vae) -> int:
    """Pixels per latent cell of a VAE (or of its config): one halving per encoder block after the first."""
    config = getattr(vae, "config", vae)
    return 2 ** (len(config["block_out_channels"]) - 1)


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents (scaled as in training) -> images in [-1, 1]."""
    return vae.decode(z / vae.config.scaling_factor).sample
