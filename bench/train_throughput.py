"""Training throughput of ditkit's step: images/s, TFLOP/s, MFU and peak memory.

The step is `Trainer.train_step` (uniform t, MSE + VB, AdamW, EMA) on latents already in
memory, as the official figures in ../shared/reference/anchors.md were taken. TFLOP/s counts
2 FLOPs per multiply-add and a train step as 3 forwards (the anchors' convention).

    python bench/train_throughput.py --model DiT-XL/2 --batch 128 --precision bf16 --compile
    python bench/train_throughput.py --model DiT-S/2 --batch 64 --precision fp32 bf16
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import replace

import torch

from ditkit.flops import measure
from ditkit.config import TrainConfig
from ditkit.train import ClassTask, Trainer

# Official DiT code on one H100 (anchors.md): (model, batch, precision) -> images/s.
OFFICIAL_H100 = {
    ("DiT-S/2", 64, "fp32"): 1275, ("DiT-S/2", 64, "bf16"): 1096, ("DiT-S/2", 64, "bf16+compile"): 1623,
    ("DiT-B/2", 64, "fp32"): 645, ("DiT-B/2", 64, "bf16"): 1001, ("DiT-B/2", 64, "bf16+compile"): 1560,
    ("DiT-XL/2", 32, "fp32"): 147, ("DiT-XL/2", 32, "bf16"): 216, ("DiT-XL/2", 32, "bf16+compile"): 313,
    ("DiT-XL/2", 128, "bf16"): 329, ("DiT-XL/2", 128, "bf16+compile"): 476,
}  # fmt: skip


class LatentsInMemory(torch.utils.data.Dataset):
    """Stands in for a latent store: the step never sees the data source."""

    num_classes, channels, class_names, vae = 1000, 4, (), None

    def __init__(self, n: int, size: int):
        self.image_size = size
        self.x = torch.randn(n, 4, size, size)
        self.y = torch.randint(0, 1000, (n,))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def set_epoch(self, epoch):
        pass


def bench(model: str, batch: int, precision: str, compile: bool, steps: int, warmup: int, device: str, image_size: int):
    latent = image_size // 8
    cfg = TrainConfig(model=model, global_batch_size=batch, precision=precision, compile=compile, device=device,
                      num_workers=0, results_dir="/tmp/ditkit-bench")  # fmt: skip
    class InMemory(ClassTask):  # the step alone: latents already in memory, no data loading
        def dataset(self, cfg, channels, d):
            return LatentsInMemory(batch, latent)

    trainer = Trainer(cfg, task=InMemory())
    dev = trainer.d.device
    x = torch.randn(batch, 4, latent, latent, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        trainer.train_step(x, y)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
    sync()
    seconds = (time.perf_counter() - start) / steps
    macs = measure(replace(trainer.model_config, class_dropout_prob=0.1)).macs
    tflops = 6 * macs * batch / seconds / 1e12
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS, GiB
    return batch / seconds, tflops, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["DiT-S/2"])
    p.add_argument("--batch", nargs="+", type=int, default=[64])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-tflops", type=float, default=788.0, help="bf16 matrix ceiling for MFU (H100: 788 measured)")
    args = p.parse_args()
    rows = []
    for model in args.model:
        for batch in args.batch:
            for precision in args.precision:
                for comp in ([False, True] if args.compile else [False]):
                    ips, tflops, peak = bench(model, batch, precision, comp, args.steps, args.warmup, args.device, args.image_size)
                    key = precision + ("+compile" if comp else "")
                    official = OFFICIAL_H100.get((model, batch, key))
                    rows.append((model, batch, key, ips, tflops, 100 * tflops / args.peak_tflops, peak / batch * 1024, official))
                    print(f"{model} batch {batch} {key}: {ips:.1f} images/s", flush=True)
    print("\n| model | batch | precision | images/s | TFLOP/s | MFU % | peak MiB/image | official H100 images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for m, b, k, ips, tf, mfu, mem, off in rows:
        print(f"| {m} | {b} | {k} | {ips:.1f} | {tf:.2f} | {mfu:.2f} | {mem:.1f} | {off if off else '-'} |")


if __name__ == "__main__":
    main()
