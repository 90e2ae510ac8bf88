"""The runs of a study: every (network, seed) the grids ask for, each with its Trainer settings.

Every run takes the recipe's training settings (objective, times, loss, optimizer and schedule, EMA,
batch, precision) and the same number of images; the study sets the network, the seed and the
budget, and two things more, the same for every run, so that the three backbones compare as their
papers define them: the DiTs take the paper's blocks (GELU MLPs, LayerNorm, sin-cos positions, no
QK-norm; the four conditioning designs need them, and U-ViT has none of the modern options), and
a flow recipe's network sees t scaled to [0, 1000], the range the three networks' time sinusoids
were laid out for (U-ViT's small models feed the raw sinusoid to attention as the time token).
torch.compile is off: its minute of compilation per run would weigh on the shortest runs' clocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..config import STUDY_SIZES, StudyConfig, TrainConfig, UNetConfig, UViTConfig
from ..config.files import load_config_file
from ..data import build_dataset, is_latent_store
from ..flops import count_macs, measure
from ..models.unet import UNetBaseline
from ..train.tasks import build_class_model

DIT, UVIT, UNET = "DiT", "U-ViT", "U-Net"
# The same for every run (module docstring): the paper's DiT blocks, the networks' time range, no compile.
PAPER_BLOCKS = {"mlp": "gelu", "norm": "layernorm", "qk_norm": False, "pos_embed": "sincos"}
FLOW_TIME_SCALE = 1000.0
# Recipe settings the study sets itself (per run) or that do not apply to its runs.
STUDY_SET = ("model", "depth", "hidden_size", "num_heads", "patch_size", "block", "mlp", "norm", "qk_norm", "pos_embed",
             "results_dir", "max_steps", "max_minutes", "epochs", "resume", "init_from", "global_seed", "ckpt_every", "keep_last",
             "keep_every", "sample_every", "log_every", "num_workers", "device", "compile", "lora_rank")  # fmt: skip
UVIT_DEPTHS = (2, 4, 6, 8)  # a U-ViT's depth (in- and out-blocks; the mid block comes on top) when sized to a Gflops level
HEAD_WIDTH = 32  # heads of the sized U-ViTs


@dataclass(frozen=True)
class DataInfo:
    input_size: int
    in_channels: int
    num_classes: int
    fashion_mnist: bool


@dataclass(frozen=True)
class Run:
    """One trained network of the study and the comparisons (grids) it belongs to."""

    name: str  # its folder under OUT/runs
    family: str  # DIT, UVIT or UNET
    label: str  # "DiT-S/4", "U-ViT 96x4/4 (level 2)"
    model: str  # the study's DiT name ("S/4"); for U-ViT and U-Net runs the DiT of their level
    block: str | None
    patch: int | None
    seed: int
    grids: tuple[str, ...]
    train: TrainConfig
    unet: UNetConfig | None = None
    level: int | None = None  # 1, 2, 3: the backbone compute level

    def factory(self):
        """What builds the network from the Trainer's model config (the U-Net's from the DiT's data fields)."""
        if self.unet is None:
            return build_class_model
        unet = self.unet
        return lambda c: UNetBaseline(replace(UNetConfig.from_dit(c, unet.base_channels), layers_per_block=unet.layers_per_block))

    def build(self, config) -> nn.Module:
        return self.factory()(config)


def data_info(data_path: str) -> DataInfo:
    path = Path(data_path)
    if is_latent_store(path):
        raise ValueError(f"{data_path} is a latent store; the study scores pixel-space samples, so pass the images (e.g. fashion-mnist).")
    ds = build_dataset(data_path, flip=False, split="train" if path.exists() else "test")
    return DataInfo(ds.image_size, ds.channels, ds.num_classes, data_path == "fashion-mnist" and not path.exists())


def recipe_settings(cfg: StudyConfig) -> dict:
    """The recipe's training settings that every run shares, with the study's fixed choices."""
    values = {k: v for k, v in load_config_file(cfg.recipe, "train").items() if k not in STUDY_SET}
    base = TrainConfig(**values)  # a bad recipe fails here, in one sentence
    if cfg.images % base.global_batch_size:
        raise ValueError(f"--images {cfg.images} is not a multiple of the recipe's batch {base.global_batch_size}; "
                         f"use --images {cfg.images // base.global_batch_size * base.global_batch_size or base.global_batch_size}.")  # fmt: skip
    if base.objective == "flow":
        values["time_scale"] = FLOW_TIME_SCALE
    return {**values, **PAPER_BLOCKS}


def steps(cfg: StudyConfig) -> int:
    return cfg.images // TrainConfig(**recipe_settings(cfg)).global_batch_size


FAMILY_KEYS = {DIT: "dit", UVIT: "uvit", UNET: "unet"}  # a family's --family-lr key


def _train(cfg: StudyConfig, base: dict, name: str, seed: int, model: str, sizes: tuple[int, int, int, int], block: str = "adaln_zero",
           family: str = DIT) -> TrainConfig:  # fmt: skip
    width, depth, heads, patch = sizes
    n = steps(cfg)
    lr = cfg.lr_of(FAMILY_KEYS[family])
    base = base if lr is None else {**base, "lr": lr}
    return TrainConfig(**base, model=model, hidden_size=width, depth=depth, num_heads=heads, patch_size=patch, block=block,
                       global_seed=seed, max_steps=n, epochs=10**6, results_dir=str(Path(cfg.out) / "runs" / name),
                       ckpt_every=max(1, n // 4), keep_last=1, log_every=min(cfg.log_every, n), num_workers=cfg.num_workers, device=cfg.device)  # fmt: skip


def dit_sizes(model: str) -> tuple[int, int, int, int]:
    """(width, depth, heads, patch) of a study DiT name such as "S/4"."""
    size, _, patch = model.partition("/")
    return (*STUDY_SIZES[size], int(patch))


def network_cost(run: Run, info: DataInfo) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of a run's network, counted on "meta"."""
    c = run.train.model_config(info.num_classes, info.input_size, info.in_channels)
    if run.unet is None:
        cost = measure(c)
        return cost.params, cost.macs
    with torch.device("meta"):
        model = run.build(c)
    return sum(p.numel() for p in model.parameters()), count_macs(model)


def size_unet(target_macs: int, like, max_channels: int = 1024) -> UNetConfig:
    """The U-Net for `like`'s data whose multiply-adds come closest (in ratio) to `target_macs`: one
    or two ResNet blocks per level (one reaches lower), base widths in multiples of 8; the count
    grows with the width, so a bisection finds it for each."""
    widths = list(range(8, max_channels + 1, 8))
    candidates = []
    for blocks in (1, 2):

        def make(i: int, blocks: int = blocks) -> UNetConfig:
            return replace(UNetConfig.from_dit(like, widths[i]), layers_per_block=blocks)

        def cost(i: int, make=make, macs: dict[int, int] = {}) -> int:  # noqa: B006 (one cache per block count)
            if i not in macs:
                with torch.device("meta"):
                    macs[i] = count_macs(UNetBaseline(make(i)))
            return macs[i]

        lo, hi = 0, len(widths) - 1
        while lo < hi:  # the first width whose count reaches the target
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if cost(mid) < target_macs else (lo, mid)
        candidates += [(abs(math.log(cost(i) / target_macs)), -blocks, make(i)) for i in {max(lo - 1, 0), lo}]
    return min(candidates, key=lambda c: c[:2])[2]


def size_uvit(target_macs: int, like: UViTConfig, dit_depth: int) -> tuple[int, int, int]:
    """(width, depth, heads) of the U-ViT at `like`'s patch whose multiply-adds come within 10% of
    `target_macs` with the depth nearest the DiT's (else the closest count): widths in steps of
    HEAD_WIDTH, depths UVIT_DEPTHS."""
    best, best_key = None, None
    for depth in UVIT_DEPTHS:
        for width in range(HEAD_WIDTH, 16 * HEAD_WIDTH + 1, HEAD_WIDTH):
            macs = measure(replace(like, embed_dim=width, depth=depth, num_heads=width // HEAD_WIDTH)).macs
            off = abs(math.log(macs / target_macs))
            key = (off > 0.1, abs(depth - dit_depth), off)
            if best_key is None or key < best_key:
                best, best_key = (width, depth, width // HEAD_WIDTH), key
            if macs > 2 * target_macs:  # wider only costs more
                break
    return best


def plan_runs(cfg: StudyConfig, info: DataInfo, saved: dict[str, dict]) -> list[Run]:
    """The size x patch grid, the blocks at --block-model, then the backbones at each level, once
    per seed; a run that two grids share is trained once. `saved` holds the run.json of started runs,
    whose sizes (the U-Net's and U-ViT's, found by a search) they keep."""
    base = recipe_settings(cfg)
    runs: dict[str, Run] = {}
    sized: dict[tuple, object] = {}  # a level's U-ViT and U-Net, the same for every seed

    def add(run: Run) -> None:
        old = runs.get(run.name)
        runs[run.name] = replace(run, grids=tuple(dict.fromkeys((*(old.grids if old else ()), *run.grids))), level=run.level or (old.level if old else None))

    for seed in cfg.seeds:
        dits = [(m, "adaln_zero", "sizes") for m in cfg.models * ("sizes" in cfg.grids)]
        dits += [(cfg.block_model, b, "blocks") for b in cfg.blocks * ("blocks" in cfg.grids)]
        dits += [(m, "adaln_zero", "backbones") for m in cfg.levels * ("backbones" in cfg.grids)]
        for model, block, grid in dits:
            name = f"dit-{model.replace('/', '-')}-{block}-s{seed}"
            level = cfg.levels.index(model) + 1 if grid == "backbones" else None
            sizes = dit_sizes(model)
            add(Run(name, DIT, f"DiT-{model}", model, block, sizes[3], seed, (grid,), _train(cfg, base, name, seed, "DiT-S/2", sizes, block), level=level))
        if "backbones" not in cfg.grids:
            continue
        for level, model in enumerate(cfg.levels, 1):
            width, depth, heads, patch = dit_sizes(model)
            dit = _train(cfg, base, "sizing", seed, "DiT-S/2", (width, depth, heads, patch))
            target = measure(dit.model_config(info.num_classes, info.input_size, info.in_channels)).macs
            name = f"uvit-L{level}-s{seed}"
            uvit = saved.get(name, {}).get("sizes")
            if uvit is None and ("uvit", level) not in sized:  # search once; a started run keeps its sizes
                like = _train(cfg, base, "sizing", seed, "U-ViT-S/2", (width, depth, heads, patch)).model_config(info.num_classes, info.input_size, info.in_channels)
                sized["uvit", level] = size_uvit(target, like, depth)
            uvit = uvit or sized["uvit", level]
            w, d, h = uvit
            add(Run(name, UVIT, f"U-ViT {w}x{d}/{patch}", model, None, patch, seed, ("backbones",),
                    _train(cfg, base, name, seed, "U-ViT-S/2", (w, d, h, patch), family=UVIT), level=level))  # fmt: skip
            name = f"unet-L{level}-s{seed}"
            unet = saved.get(name, {}).get("unet")
            if unet is None and ("unet", level) not in sized:
                sized["unet", level] = size_unet(target, dit.model_config(info.num_classes, info.input_size, info.in_channels))
            unet = UNetConfig(**unet) if unet else sized["unet", level]
            add(Run(name, UNET, f"U-Net {unet.base_channels}x{unet.layers_per_block}", model, None, None, seed, ("backbones",),
                    _train(cfg, base, name, seed, "DiT-S/2", (width, depth, heads, patch), family=UNET), unet=unet, level=level))  # fmt: skip
    return list(runs.values())


def describe_run(run: Run, info: DataInfo) -> dict:
    """run.json: what the run is, its size and compute, and its Trainer settings."""
    params, macs = network_cost(run, info)
    c = run.train.model_config(info.num_classes, info.input_size, info.in_channels)
    sizes = [c.hidden_size, c.depth, c.num_heads] if run.unet is None else None
    return {"run": run.name, "family": run.family, "label": run.label, "model": run.model, "block": run.block, "patch": run.patch,
            "seed": run.seed, "level": run.level, "grids": list(run.grids), "params": params, "gflops": macs / 1e9, "sizes": sizes,
            "unet": run.unet.__dict__ if run.unet else None, "train": run.train.flat()}  # fmt: skip
