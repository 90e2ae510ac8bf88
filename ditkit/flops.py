"""Parameters and multiply-adds of a DiT forward, counted from the operations it really runs.

The paper's "Gflops" are G multiply-adds per forward of one image (Table 1: DiT-XL/2 = 118.6).
`FlopCounterMode` sees every matmul, convolution and attention product the forward dispatches;
one multiply-add is two of its FLOPs. The forward runs on fake tensors (shapes only), so even
DiT-XL/2 is counted in a fraction of a second with no memory and no arithmetic. Element-wise
work (norms, softmax, modulation, gates) is not counted; the counts sit a hair under Table 1
(DiT-XL/2: 118.62 against the printed 118.64) and round to its figures elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .config import MMDIT_PRESETS, FlopsConfig, MMDiTConfig
from .models import DiT, DiTConfig
from .models.mmdit import MMDiT, TextCondition

# Table 1 of the paper: G multiply-adds per forward at 256 px (32x32x4 latents), adaLN-Zero.
PAPER_GFLOPS = {
    "DiT-S/2": 6.06, "DiT-S/4": 1.41, "DiT-S/8": 0.36,
    "DiT-B/2": 23.01, "DiT-B/4": 5.57, "DiT-B/8": 1.42,
    "DiT-L/2": 80.71, "DiT-L/4": 19.70, "DiT-L/8": 5.01,
    "DiT-XL/2": 118.64, "DiT-XL/4": 29.05, "DiT-XL/8": 7.39,
}  # fmt: skip
# Figure 5 of the paper: the four block designs, each on DiT-XL/2 at 256 px.
PAPER_BLOCK_GFLOPS = {"in_context": 119.4, "cross_attn": 137.6, "adaln": 118.6, "adaln_zero": 118.6}
PAPER_INPUT_SIZE, PAPER_IN_CHANNELS = 32, 4
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
        x = torch.empty(batch_size, c.in_channels, c.input_size, c.input_size, device=device)
        t = torch.empty(batch_size, device=device)
        if isinstance(c, MMDiTConfig):
            y = TextCondition(torch.empty(batch_size, FLOPS_TEXT_TOKENS, c.context_dim, device=device),
                              torch.ones(batch_size, FLOPS_TEXT_TOKENS, dtype=torch.bool, device=device),
                              torch.empty(batch_size, c.pooled_dim, device=device))  # fmt: skip
        else:
            y = torch.zeros(batch_size, dtype=torch.long, device=device)
        with counter:
            model(x, t, y)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class Cost:
    """Size and compute of one DiT; `gflops` is the paper's unit, G multiply-adds per image."""

    model: str
    block: str
    input_size: int
    in_channels: int
    patch_size: int
    tokens: int  # image tokens; in-context conditioning adds 2 more inside the blocks
    params: int  # every parameter, the fixed pos_embed included (the official count)
    trainable_params: int
    macs: int
    paper_gflops: float | None  # the paper's figure for this config, where it reports one

    @property
    def gflops(self) -> float:
        return self.macs / 1e9

    def as_dict(self) -> dict:
        return {**asdict(self), "gflops": self.gflops}


def paper_gflops(name: str, config: DiTConfig) -> float | None:
    """The paper's Gflops for a preset, where Table 1 or Figure 5 reports it."""
    if (config.input_size, config.in_channels, config.learn_sigma) != (PAPER_INPUT_SIZE, PAPER_IN_CHANNELS, True):
        return None
    if config.block == "adaln_zero":
        return PAPER_GFLOPS.get(name)
    return PAPER_BLOCK_GFLOPS[config.block] if name == "DiT-XL/2" else None


def measure(config: DiTConfig | MMDiTConfig, name: str = "custom") -> Cost:
    """Parameters and multiply-adds of the DiT (or MMDiT) `config` describes, built on "meta" (no memory)."""
    text = isinstance(config, MMDiTConfig)
    with torch.device("meta"):
        model = MMDiT(config) if text else DiT(config)
    params = list(model.parameters())
    return Cost(
        model=name,
        block="joint" if text else config.block,
        input_size=config.input_size,
        in_channels=config.in_channels,
        patch_size=config.patch_size,
        tokens=model.num_patches,
        params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        macs=count_macs(model),
        paper_gflops=None if text else paper_gflops(name, config),
    )


def measure_preset(name: str, **overrides) -> Cost:
    """`measure` of a paper preset ("DiT-XL/2") with any config field overridden."""
    return measure(DiTConfig.from_preset(name, **overrides), name)


def measure_all(cfg: FlopsConfig) -> list[Cost]:
    """One `Cost` per (preset, block design), presets outermost; MMDiT presets once each (joint blocks,
    the text at FLOPS_TEXT_TOKENS tokens of all-MiniLM-L6-v2's width)."""
    common = dict(input_size=cfg.resolved_input_size, in_channels=cfg.in_channels)
    costs = []
    for name in cfg.model:
        if name in MMDIT_PRESETS:
            costs.append(measure(MMDiTConfig.from_preset(name, **common), name))
        else:
            costs += [measure_preset(name, block=block, num_classes=cfg.num_classes, **common) for block in cfg.block]
    return costs


def format_table(costs: list[Cost]) -> str:
    rows = [("model", "block", "input", "tokens", "params (M)", "Gflops", "paper")]
    for c in costs:
        paper = f"{c.paper_gflops:g}" if c.paper_gflops is not None else "-"
        size = f"{c.input_size}x{c.input_size}x{c.in_channels}"
        rows.append((c.model, c.block, size, str(c.tokens), f"{c.params / 1e6:.2f}", f"{c.gflops:.2f}", paper))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def run_flops(cfg: FlopsConfig) -> int:
    costs = measure_all(cfg)
    print(json.dumps([c.as_dict() for c in costs], indent=1) if cfg.json else format_table(costs))
    return 0
