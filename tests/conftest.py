"""Helpers shared by the tests: the reference data, relative error, a tiny real VAE, a free port,
one compute thread."""

import contextlib
import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ditkit

# Copies of ../shared/reference (tensors made by the official DiT and SiT code), so every clone checks them.
REFERENCE = Path(__file__).parent / "reference"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the error measure of the reference README."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_vae(folder, levels: int = 2):
    """A randomly initialised diffusers AutoencoderKL, saved to `folder` (factor 2 ** (levels - 1))."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=4,
        layers_per_block=1, sample_size=32,
    )  # fmt: skip
    vae.save_pretrained(folder)
    return vae


def load_reference(name: str):
    """(meta, model in eval mode, io tensors) of tests/reference/{official/tiny_latent, sit/tiny_sit}."""
    folder, stem = {"official": ("official", "tiny_latent"), "sit": ("sit", "tiny_sit")}[name]
    root = REFERENCE / folder
    meta = json.loads((root / f"{stem}.json").read_text())
    model = ditkit.DiT(**meta["config"])
    model.load_state_dict(load_file(str(root / f"{stem}.weights.safetensors")), strict=True)
    return meta, model.eval(), load_file(str(root / f"{stem}.io.safetensors"))


@pytest.fixture(scope="module")
def official_ref():
    return load_reference("official")


@pytest.fixture(scope="module")
def sit_ref():
    return load_reference("sit")


@pytest.fixture
def one_thread():
    """One torch / BLAS thread: on two busy cores, two OpenMP threads spin-wait each other (tiny
    models sampled 8x slower, FD-EffNet's 1280x1280 eigendecompositions 7x), and tiny models need one."""
    try:
        from threadpoolctl import threadpool_limits  # comes with scikit-learn (the digits)
    except ImportError:
        threadpool_limits = contextlib.nullcontext
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "dark", "light", "small", "large", "photo", "of", "coat",
              "bag", "sneaker", "pair", "trousers", "t", "-", "shirt", ",", "and", "that", "is", "picture", "here", "dress"]  # fmt: skip


def tiny_text_encoder(folder, hidden: int = 16):
    """A randomly initialised BERT (2 layers, `hidden` wide) and its WordPiece tokenizer from a small
    vocabulary file, saved as a Hugging Face folder: the real loading path of ditkit.text on a tiny model."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt"), model_max_length=512).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory):
    return tiny_text_encoder(tmp_path_factory.mktemp("encoder") / "tiny-bert")


def randomize_weights(model, seed: int = 0, std: float = 0.05):
    """Every learned parameter (not the fixed pos_embed) drawn N(0, std^2) from `seed`, so that
    zero-initialised gates and outputs carry signal; the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def assert_resume_exact(kw: dict, tmp_path) -> None:
    """4 training steps straight equal 2 steps, a resume and 2 more: model and EMA weights, exactly."""
    from ditkit.config import TrainConfig
    from ditkit.train import Trainer
    from ditkit.utils.io import read_pt

    kw = dict(kw, ckpt_every=2)
    straight = Trainer(TrainConfig(**kw, max_steps=4, results_dir=str(tmp_path / "a"))).run()
    Trainer(TrainConfig(**kw, max_steps=2, results_dir=str(tmp_path / "b"))).run()
    resumed = Trainer(TrainConfig(results_dir=str(tmp_path / "b"), resume="latest", max_steps=4)).run()
    a, b = (read_pt(r / "checkpoints" / "0000004.pt") for r in (straight, resumed))
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
