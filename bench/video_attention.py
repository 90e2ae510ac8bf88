"""What attention over spacetime tokens costs as clips grow: training step time and peak memory of a
video DiT against the number of frames, for joint, factorized and windowed attention, with the
forward's multiply-adds (`ditkit flops`) beside.

The step is `Trainer.train_step` (flow matching, AdamW, EMA) on clips already in memory. Each
(attention, frames) runs in a process of its own, so its peak RSS is its own: "peak MiB" is that
process's peak resident memory, "step MiB" what it grew by from just before the first step (the
step's activations, gradients and optimizer state). "CPU s / step" is the process's CPU time per
step (user + system, both threads), which other jobs on the cores disturb far less than the
wall-clock "s / step".

    python bench/video_attention.py                      # the bundled image model's widths, batch 8, bf16
    python bench/video_attention.py --frames 8 16 --attention joint factorized --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from ditkit.config import ATTENTIONS, TrainConfig
from ditkit.flops import measure
from ditkit.video.task import VideoTask

MODEL = dict(model="VDiT-S/4x1", hidden_size=160, depth=8, num_heads=4, window=4)  # the bundled image model's widths (DiT-S/4 at 160 wide, 8 blocks), 1-frame tubelets


class ClipsInMemory(torch.utils.data.Dataset):
    """Stands in for moving-fashion-mnist: the step never sees the data source."""

    num_classes, channels, image_size, class_names, vae = 10, 1, 32, (), None

    def __init__(self, n: int, frames: int):
        self.frames = frames
        self.x = torch.randn(n, 1, frames, 32, 32)
        self.y = torch.randint(0, 10, (n,))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def set_epoch(self, epoch):
        pass


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(attention: str, frames: int, batch: int, steps: int, warmup: int, precision: str) -> dict:
    """Seconds per step and memory of one (attention, frames), in this process."""
    from ditkit.train import Trainer

    class InMemory(VideoTask):
        def dataset(self, cfg, channels, d):
            self.frames = frames
            return ClipsInMemory(batch, frames)

    torch.manual_seed(0)
    cfg = TrainConfig(**MODEL, attention=attention, data_path="moving-fashion-mnist", objective="flow", learn_sigma=False,
                      global_batch_size=batch, precision=precision, num_workers=0, device="cpu", results_dir="/tmp/ditkit-bench-video")  # fmt: skip
    trainer = Trainer(cfg, task=InMemory())
    x, y = next(iter(trainer.loader()[0]))
    before = rss_mib()
    for i in range(warmup + steps):
        if i == warmup:
            start, cpu = time.perf_counter(), cpu_seconds()
        trainer.train_step(x, y).item()  # .item() waits for the step
        trainer.step += 1
    seconds, cpu = (time.perf_counter() - start) / steps, (cpu_seconds() - cpu) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {"step_s": seconds, "cpu_s": cpu, "peak_mib": peak, "step_mib": peak - before, "tokens": trainer.model.num_patches,
            "gflops": measure(trainer.model_config).gflops}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    p.add_argument("--frames", nargs="+", type=int, default=[8, 16, 32])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--one", nargs=2, metavar=("ATTENTION", "FRAMES"), help=argparse.SUPPRESS)  # run one row, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.batch, args.steps, args.warmup, args.precision)))
        return
    print(f"{MODEL['model']} at {MODEL['hidden_size']} wide, {MODEL['depth']} blocks, 32x32x1 frames, batch {args.batch}, {args.precision}, "
          f"window {MODEL['window']} frames; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    rows = {}
    for frames in args.frames:
        for attention in args.attention:
            cmd = [sys.executable, __file__, "--one", attention, str(frames), *[f"--{k}={getattr(args, k)}" for k in ("batch", "steps", "warmup", "precision")]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{attention} at {frames} frames failed:\n{out.stderr[-2000:]}")
            rows[attention, frames] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[attention, frames]
            print(f"  {attention:<10} {frames:>3} frames: {r['step_s']:.3f} s/step, {r['cpu_s']:.3f} CPU s/step, peak {r['peak_mib']:.0f} MiB", flush=True)
    print("\n| frames | tokens | attention | G multiply-adds / clip | CPU s / step | s / step | peak MiB | step MiB | joint / this: multiply-adds, CPU s, s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (attention, frames), r in rows.items():
        joint = rows.get(("joint", frames))
        ratio = f"{joint['gflops'] / r['gflops']:.2f}, {joint['cpu_s'] / r['cpu_s']:.2f}, {joint['step_s'] / r['step_s']:.2f}" if joint else "-"
        print(f"| {frames} | {r['tokens']} | {attention} | {r['gflops']:.2f} | {r['cpu_s']:.2f} | {r['step_s']:.2f} | "
              f"{r['peak_mib']:.0f} | {r['step_mib']:.0f} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
