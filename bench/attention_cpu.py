"""Attention forward + backward on this machine: PyTorch's SDPA against the math form
(softmax(q k^T / sqrt(d)) v as matmuls), by precision and sequence length. It is the measurement
behind `ditkit.models.layers.attention`, which takes the math form for a CPU backward in bf16 or
fp16 over at most CPU_MATH_ATTENTION_MAX_KEYS keys.

    python bench/attention_cpu.py
    python bench/attention_cpu.py --heads 4 --head-dim 48 --repeat 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditkit.models.layers import CPU_MATH_ATTENTION_MAX_KEYS  # noqa: E402

# (tokens, batch): DiT-S/4 on 32x32 (64 tokens, a training batch of 128), MMDiT-S/4 on 32x32 with
# a 77-token prompt (141), S/2 on 32x32 or XL/2 at 256 px (256 tokens), XL/2 at 512 px (1024 tokens)
SHAPES = ((64, 128), (141, 56), (192, 42), (256, 32), (1024, 4))


def math_attention(q, k, v):
    """ditkit's math form as it runs eagerly (softmax in the input's precision)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(-1) @ v


def ms_per_call(fn, dtype, tokens: int, batch: int, heads: int, head_dim: int, repeat: int, backward: bool) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g).to(dtype).requires_grad_(backward) for _ in range(3))
    grad = torch.randn(batch, heads, tokens, head_dim, generator=g).to(dtype)

    def call():
        out = fn(q, k, v)
        if backward:
            out.backward(grad)

    with torch.set_grad_enabled(backward):
        for _ in range(2):
            call()
        start = time.perf_counter()
        for _ in range(repeat):
            call()
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=48)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.heads} heads of {args.head_dim}; "
          f"ditkit takes the math form for a CPU half-precision backward over <= {CPU_MATH_ATTENTION_MAX_KEYS} keys\n")  # fmt: skip
    print("| dtype | pass | tokens | batch | SDPA ms | math ms | SDPA / math |\n|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for backward in (False, True):
            for tokens, batch in SHAPES:
                repeat = max(2, args.repeat * 64 // tokens)
                a, b = (ms_per_call(fn, dtype, tokens, batch, args.heads, args.head_dim, repeat, backward)
                        for fn in (F.scaled_dot_product_attention, math_attention))  # fmt: skip
                print(f"| {str(dtype).removeprefix('torch.')} | {'forward + backward' if backward else 'forward'} | {tokens} | {batch} | "
                      f"{a:.1f} | {b:.1f} | {a / b:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
