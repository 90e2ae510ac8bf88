"""ditkit's training step against the official DiT step, side by side in one process on this machine.

Same model (the fmnist-cpu shape: DiT-S/4 at width 192, depth 8, 4 heads, 32x32x1 Fashion-MNIST,
10 classes), same batch, same objective (the paper's: uniform t, eps MSE + VB, AdamW 1e-4, EMA
every step), in the same precision settings. The official side is facebookresearch/DiT's
models.py + diffusion/ and the body of its train.py loop, with the batch already in memory as a
tensor (its best case: no DataLoader, no logging). ditkit's side is `Trainer` as `ditkit train`
runs it: the Fashion-MNIST dataset with flips through its DataLoader, the EMA, the loss log.
Runs alternate (official, ditkit, official, ...) so drift on a shared machine hits both.

The official code is not part of ditkit: get it into the git-ignored .ext/ first,
    git clone https://github.com/facebookresearch/DiT .ext/DiT
It imports timm's PatchEmbed, Attention and Mlp; `timm_stand_in` below provides those three
layers with timm's names and behaviour (SDPA attention), so timm need not be installed.

    python bench/train_step_vs_official.py --settings fp32 fp32+compile bf16+compile --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditkit.config import TrainConfig  # noqa: E402
from ditkit.train import Trainer  # noqa: E402

SHAPE = dict(model="DiT-S/4", hidden_size=192, depth=8, num_heads=4)


def timm_stand_in() -> None:
    """timm.models.vision_transformer's PatchEmbed, Attention and Mlp as the official models.py uses them."""

    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
            super().__init__()
            self.num_patches = (img_size // patch_size) ** 2
            self.patch_size = (patch_size, patch_size)
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(nn.Module):
        def __init__(self, dim, num_heads=8, qkv_bias=False, **kw):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(B, N, C))

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), act_layer(), nn.Linear(hidden_features, in_features)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    module = types.ModuleType("timm.models.vision_transformer")
    module.PatchEmbed, module.Attention, module.Mlp = PatchEmbed, Attention, Mlp
    for name in ("timm", "timm.models"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["timm.models.vision_transformer"] = module


def official_runner(path: Path, batch: int, precision: str, compile: bool):
    """The official train.py loop body on an in-memory batch of Fashion-MNIST."""
    timm_stand_in()
    sys.path.insert(0, str(path))
    from diffusion import create_diffusion
    from models import DiT

    from ditkit.data import build_dataset

    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=4, in_channels=1, hidden_size=192, depth=8, num_heads=4, num_classes=10)
    ema = DiT(input_size=32, patch_size=4, in_channels=1, hidden_size=192, depth=8, num_heads=4, num_classes=10)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    net = torch.compile(model) if compile else model
    ds = build_dataset("fashion-mnist", flip=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    x_all, y_all = next(iter(loader))

    def update_ema(decay=0.9999):
        ema_params = OrderedDict(ema.named_parameters())
        for name, param in OrderedDict(model.named_parameters()).items():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    def step():
        x, y = x_all, y_all
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion.training_losses(net, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema()
        return loss.item()  # the official loop reads the loss every step for its running average

    model.train()
    return step


def ditkit_runner(batch: int, precision: str, compile: bool, results: Path):
    cfg = TrainConfig(data_path="fashion-mnist", **SHAPE, global_batch_size=batch, precision=precision, compile=compile,
                      num_workers=0, results_dir=str(results), device="cpu", log_every=10**9, ckpt_every=10**9)  # fmt: skip
    trainer = Trainer(cfg)
    loader, sampler = trainer.loader()
    batches = iter(loader)
    trainer.net.train()

    def step():
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        loss = trainer.train_step(x, y)
        trainer.step += 1
        return loss

    return step


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", default=str(ROOT / ".ext" / "DiT"), help="checkout of facebookresearch/DiT")
    p.add_argument("--settings", nargs="*", default=["fp32", "fp32+compile", "bf16+compile"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    if not (Path(args.official) / "models.py").exists():
        sys.exit(f"no official DiT code at {args.official}; git clone https://github.com/facebookresearch/DiT {args.official}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, DiT-S/4 w192 d8 on 32x32x1")
    rows = []
    for setting in args.settings:
        precision = "bf16" if setting.startswith("bf16") else "fp32"
        compile = setting.endswith("+compile")
        runners = {"official": official_runner(Path(args.official), args.batch, precision, compile),
                   "ditkit": ditkit_runner(args.batch, precision, compile, ROOT / "results" / "bench-step")}  # fmt: skip
        for step in runners.values():
            timed(step, args.warmup)
        rates = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, step in runners.items():
                rates[name].append(args.batch * args.steps / timed(step, args.steps))
        official, ours = statistics.median(rates["official"]), statistics.median(rates["ditkit"])
        rows.append((setting, official, ours))
        print(f"{setting:<14} official {official:7.1f} img/s   ditkit {ours:7.1f} img/s   ratio {ours / official:.2f}   "
              f"(rounds: {', '.join(f'{a:.0f}/{b:.0f}' for a, b in zip(rates['official'], rates['ditkit']))})", flush=True)
    print("\n| setting | official img/s | ditkit img/s | ditkit / official |\n|---|---|---|---|")
    for setting, official, ours in rows:
        print(f"| {setting} | {official:.1f} | {ours:.1f} | {ours / official:.2f} |")


if __name__ == "__main__":
    main()
