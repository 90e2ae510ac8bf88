"""Parameters and multiply-adds of a DiT (or U-ViT) forward, counted from the operations it really runs.

The paper's "Gflops" are G multiply-adds per forward of one image (Table 1: DiT-XL/2 = 118.6).
`FlopCounterMode` sees every matmul, convolution and attention product the forward dispatches;
one multiply-add is two of its FLOPs. The forward runs on fake tensors (shapes only), so even
DiT-XL/2 is counted in a fraction of a second with no memory and no arithmetic. Element-wise
work (norms, softmax, modulation, gates) is not counted; the counts sit a hair under Table 1
(DiT-XL/2: 118.62 against the printed 118.64) and round to its figures elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .checkpoints import infer_config, read_checkpoint
from .config import (
    FLOPS_IMAGE_SIZE,
    FLOPS_IN_CHANNELS,
    FLOPS_NUM_CLASSES,
    MMDIT_PRESETS,
    SD_VAE_FACTOR,
    UVIT_PRESETS,
    VIDEO_MMDIT_PRESETS,
    VIDEO_PRESETS,
    FlopsConfig,
    MMDiTConfig,
    UViTConfig,
    VideoDiTConfig,
    VideoMMDiTConfig,
)
from .models import PRESETS, DiT, DiTConfig, UViT
from .models.mmdit import TextCondition, build_mmdit
from .models.video import VideoDiT
from .utils.runs import find_checkpoint

# Table 1 of the paper: G multiply-adds per forward at 256 px (32x32x4 latents), adaLN-Zero.
PAPER_GFLOPS = {
    "DiT-S/2": 6.06, "DiT-S/4": 1.41, "DiT-S/8": 0.36,
    "DiT-B/2": 23.01, "DiT-B/4": 5.57, "DiT-B/8": 1.42,
    "DiT-L/2": 80.71, "DiT-L/4": 19.70, "DiT-L/8": 5.01,
    "DiT-XL/2": 118.64, "DiT-XL/4": 29.05, "DiT-XL/8": 7.39,
}  # fmt: skip
# Figure 5 of the paper: the four block designs, each on DiT-XL/2 at 256 px (printed to one decimal there).
PAPER_BLOCK_GFLOPS = {"in_context": 119.4, "cross_attn": 137.6, "adaln": 118.6, "adaln_zero": 118.6}
PAPER_INPUT_SIZE = FLOPS_IMAGE_SIZE // SD_VAE_FACTOR
FLOPS_TEXT_TOKENS = 77  # prompt length MMDiT is counted at (one CLIP context)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV, as torch's formula for the other SDPA kernels (softmax is not counted)."""
    b, h, s_q, d_qk = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * (d_qk + d_v)


# torch has no formula for the CPU flash kernel SDPA dispatches to on real or fake CPU tensors,
# so attention would silently count as zero there (on meta tensors SDPA decomposes into bmm).
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_EXTRA_FORMULAS = {_CPU_SDPA: _sdpa_flops} if _CPU_SDPA is not None and _CPU_SDPA not in flop_registry else {}


def count_macs(model: nn.Module, batch_size: int = 1) -> int:
    """Multiply-adds of one `model(x, t, y)` on `batch_size` samples of the model's input shape.

    Runs on fake tensors: nothing is computed and the weights are not touched, whether the model
    lives on a real device or on "meta".
    """
    c = model.config
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        x = torch.empty(batch_size, *c.sample_shape, device=device)
        t = torch.empty(batch_size, device=device)
        if isinstance(c, MMDiTConfig):
            y = TextCondition(torch.empty(batch_size, FLOPS_TEXT_TOKENS, c.context_dim, device=device),
                              torch.ones(batch_size, FLOPS_TEXT_TOKENS, dtype=torch.bool, device=device),
                              torch.empty(batch_size, c.pooled_dim, device=device))  # fmt: skip
        elif getattr(c, "conditional", True):
            y = torch.zeros(batch_size, dtype=torch.long, device=device)
        else:  # an unconditional U-ViT takes no labels
            y = None
        with counter:
            model(x, t, y)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class Cost:
    """Size and compute of one DiT; `gflops` is the paper's unit, G multiply-adds per image (per clip
    for a video DiT, whose `block` also names its attention)."""

    model: str  # the paper's name of the config's size ("DiT-S/4"), or "custom"
    block: str
    input_size: int
    in_channels: int
    patch_size: int
    depth: int
    hidden_size: int
    num_heads: int
    tokens: int  # image (or clip) tokens; in-context conditioning adds 2 more inside the blocks
    frames: int  # 1 for images
    params: int  # every parameter, the fixed pos_embed included (the official count)
    trainable_params: int
    macs: int
    paper_gflops: float | None  # the paper's figure for this config, where it reports one

    @property
    def gflops(self) -> float:
        return self.macs / 1e9

    def as_dict(self) -> dict:
        return {**asdict(self), "gflops": self.gflops}


def preset_name(config: DiTConfig | MMDiTConfig | UViTConfig) -> str:
    """The paper's name of a config ("DiT-S/4", "MMDiT-S/4", "U-ViT-H/2") when it is that preset at some data shape, else "custom"."""
    if isinstance(config, UViTConfig):
        data = {f: getattr(config, f) for f in ("img_size", "in_chans", "num_classes", "class_dropout_prob", "conv", "mlp_time_embed", "qkv_bias")}
        same = (n for n in UVIT_PRESETS if n.endswith(f"/{config.patch_size}") and UViTConfig.from_preset(n, **data) == config)
        return next(same, "custom")
    if isinstance(config, VideoMMDiTConfig):
        data = {f: getattr(config, f) for f in ("input_size", "in_channels", "context_dim", "pooled_dim", "learn_sigma", "frames")}
        same = (n for n in VIDEO_MMDIT_PRESETS if n.endswith(f"/{config.patch_size}x{config.tubelet}") and VideoMMDiTConfig.from_preset(n, **data) == config)
        return next(same, "custom")
    if isinstance(config, MMDiTConfig):
        data = {f: getattr(config, f) for f in ("input_size", "in_channels", "context_dim", "pooled_dim", "learn_sigma")}
        same = (n for n in MMDIT_PRESETS if n.endswith(f"/{config.patch_size}") and MMDiTConfig.from_preset(n, **data) == config)
        return next(same, "custom")
    if isinstance(config, VideoDiTConfig):
        data = {f: getattr(config, f) for f in ("input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob", "block", "frames", "attention", "window")}
        same = (n for n in VIDEO_PRESETS if n.endswith(f"/{config.patch_size}x{config.tubelet}") and VideoDiTConfig.from_preset(n, **data) == config)
        return next(same, "custom")
    data = {f: getattr(config, f) for f in ("input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob", "block")}
    same = (n for n in PRESETS if n.endswith(f"/{config.patch_size}") and DiTConfig.from_preset(n, **data) == config)
    return next(same, "custom")


def paper_gflops(name: str, config: DiTConfig) -> float | None:
    """The paper's Gflops for a preset, where Table 1 or Figure 5 reports it."""
    if preset_name(config) != name or (config.input_size, config.in_channels, config.learn_sigma) != (PAPER_INPUT_SIZE, FLOPS_IN_CHANNELS, True):
        return None
    if config.block == "adaln_zero":
        return PAPER_GFLOPS.get(name)
    return PAPER_BLOCK_GFLOPS[config.block] if name == "DiT-XL/2" else None


def measure(config: DiTConfig | MMDiTConfig | UViTConfig | VideoDiTConfig, name: str | None = None) -> Cost:
    """Parameters and multiply-adds of the DiT (or MMDiT, U-ViT or video DiT) `config` describes, built
    on "meta" (no memory). A U-ViT's depth is its paper's layer count (in-blocks, the mid block,
    out-blocks) and its block "long-skips" (or "no-skips"); a video DiT's block also names its attention."""
    text, uvit, video = isinstance(config, MMDiTConfig), isinstance(config, UViTConfig), isinstance(config, VideoDiTConfig)
    name = name or preset_name(config)
    with torch.device("meta"):
        model = build_mmdit(config) if text else UViT(config) if uvit else VideoDiT(config) if video else DiT(config)
    params = list(model.parameters())
    return Cost(
        model=name,
        block="joint" if text else ("long-skips" if config.skip else "no-skips") if uvit else f"{config.block} {config.attention}" if video else config.block,
        input_size=config.input_size,
        in_channels=config.in_channels,
        patch_size=config.patch_size,
        depth=config.num_blocks if uvit else config.depth,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        tokens=(config.img_size // config.patch_size) ** 2 if uvit else model.num_patches,
        frames=config.frames if video or isinstance(config, VideoMMDiTConfig) else 1,
        params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        macs=count_macs(model),
        paper_gflops=None if text or uvit or video else paper_gflops(name, config),
    )


def measure_preset(name: str, **overrides) -> Cost:
    """`measure` of a paper preset ("DiT-XL/2") with any config field overridden."""
    return measure(DiTConfig.from_preset(name, **overrides))


def checkpoint_config(ckpt: str) -> DiTConfig | MMDiTConfig | UViTConfig:
    """The config of a checkpoint (what it records, or what its shapes say)."""
    ck = read_checkpoint(find_checkpoint(ckpt))
    config = ck.config or infer_config(ck.state)
    if config is None:
        raise ValueError(f"{ck.path} is not a DiT checkpoint: no DiT parameters were found in it.")
    return config


def model_configs(cfg: FlopsConfig) -> list[DiTConfig | MMDiTConfig]:
    """Every config to count: each preset (or the checkpoint's model) with the overrides, times each
    block design, presets outermost; MMDiTs once each (joint blocks, no classes, the text at
    FLOPS_TEXT_TOKENS tokens of all-MiniLM-L6-v2's width)."""
    sizes = {k: getattr(cfg, k) for k in ("depth", "hidden_size", "num_heads", "patch_size", "num_classes") if getattr(cfg, k) is not None}
    if cfg.ckpt is not None:
        base = checkpoint_config(cfg.ckpt)
        in_channels = cfg.in_channels or base.in_channels
        input_size = cfg.input_size_for(in_channels) or base.input_size
        bases = [base]
    else:
        in_channels = cfg.in_channels or FLOPS_IN_CHANNELS
        input_size = cfg.input_size_for(in_channels) or (PAPER_INPUT_SIZE if in_channels not in (1, 3) else FLOPS_IMAGE_SIZE)
        bases = [preset_config(name) for name in cfg.model or PRESETS]
    if (cfg.frames or cfg.attention) and not any(isinstance(b, (VideoDiTConfig, VideoMMDiTConfig)) for b in bases):
        raise ValueError("--frames and --attention shape video models; count a VDiT-* or MMDiT-*x* --model (or a video checkpoint), or drop them.")
    configs = []
    for base in bases:
        if isinstance(base, VideoDiTConfig):
            base = replace(base, input_size=input_size, in_channels=in_channels, **sizes, **({"frames": cfg.frames} if cfg.frames else {}))
            configs += [replace(base, block=block, attention=attention) for block in cfg.block or (base.block,) for attention in cfg.attention or (base.attention,)]
        elif isinstance(base, UViTConfig):
            uvit_sizes = {"embed_dim" if k == "hidden_size" else k: v for k, v in sizes.items() if k != "num_classes"}
            classes = sizes.get("num_classes", base.num_classes - 1) + 1  # the null class on top, as the ImageNet U-ViTs have it
            configs.append(replace(base, img_size=input_size, in_chans=in_channels, conv=in_channels in (1, 3), num_classes=classes, **uvit_sizes))
        elif isinstance(base, MMDiTConfig):
            if cfg.attention and isinstance(base, VideoMMDiTConfig) and set(cfg.attention) != {"joint"}:
                raise ValueError("a text-to-video model (MMDiT-*x*) attends jointly over text and spacetime tokens; drop --attention, or count a VDiT-* --model for the factorized and windowed arrangements.")
            frames = {"frames": cfg.frames} if cfg.frames and isinstance(base, VideoMMDiTConfig) else {}  # text-to-video: joint attention only
            configs.append(replace(base, input_size=input_size, in_channels=in_channels, **frames, **{k: v for k, v in sizes.items() if k != "num_classes"}))
        else:
            base = replace(base, input_size=input_size, in_channels=in_channels, **sizes)
            configs += [replace(base, block=block) for block in cfg.block or (base.block,)]
    return configs


def preset_config(name: str) -> DiTConfig | MMDiTConfig | UViTConfig | VideoDiTConfig:
    """A preset at the paper's counting setting: 1 000 classes (+ the null class for a U-ViT)."""
    if name in MMDIT_PRESETS:
        return MMDiTConfig.from_preset(name)
    if name in VIDEO_MMDIT_PRESETS:
        return VideoMMDiTConfig.from_preset(name)
    if name in UVIT_PRESETS:
        return UViTConfig.from_preset(name, num_classes=FLOPS_NUM_CLASSES + 1, conv=False)
    return (VideoDiTConfig if name in VIDEO_PRESETS else DiTConfig).from_preset(name, num_classes=FLOPS_NUM_CLASSES)

def measure_all(cfg: FlopsConfig) -> list[Cost]:
    return [measure(c) for c in model_configs(cfg)]


def format_table(costs: list[Cost]) -> str:
    rows = [("model", "block", "input", "patch", "depth", "hidden", "heads", "tokens", "params (M)", "Gflops", "paper")]
    for c in costs:
        paper = f"{c.paper_gflops:.2f}" if c.paper_gflops is not None else "-"
        size = f"{f'{c.frames}x' if c.frames > 1 else ''}{c.input_size}x{c.input_size}x{c.in_channels}"
        rows.append((c.model, c.block, size, *map(str, (c.patch_size, c.depth, c.hidden_size, c.num_heads, c.tokens)),
                     f"{c.params / 1e6:.2f}", f"{c.gflops:.2f}", paper))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def run_flops(cfg: FlopsConfig) -> int:
    costs = measure_all(cfg)
    print(json.dumps([c.as_dict() for c in costs], indent=1) if cfg.json else format_table(costs))
    return 0
