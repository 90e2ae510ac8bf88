"""Time to quality on this machine: train recipes one after the other from scratch for the same
wall-clock budget, then sample each (its recorded default sampling) and score the samples with
`ditkit eval` against the Fashion-MNIST test set: FD-EffNet (beside the real-vs-real distance at
the same sample count) and class accuracy (beside the classifier's own test accuracy).

    python bench/time_to_quality.py --minutes 15                          # paper (fp32; bf16 + compile), fmnist-cpu, fmnist-fast
    python bench/time_to_quality.py --minutes 5 --ablate                  # fmnist-fast, each ingredient off in turn
    python bench/time_to_quality.py --recipe fmnist-fast --set lr=2e-3    # one recipe with a change

A variant that changes only the sampling (the guidance interval, the post-hoc EMA length, autoguidance
by the run's own earlier EMA) samples fmnist-fast's model from the same run: --ablate trains with
--ema-profiles 0.05 0.10, which changes nothing in training, so that `ditkit ema` can make those
models afterwards. Rows per sample are counted at the networks (a classifier-free guided step is
two, cond and null; an autoguided step one through the model and one through the guide; an
unguided step outside the guidance interval is one). Results go to OUT/NAME/ and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditkit.cli import load_config_file  # noqa: E402
from ditkit.config import EMAConfig, EvalConfig, SampleNpzConfig, TrainConfig  # noqa: E402
from ditkit.ema import run_ema  # noqa: E402
from ditkit.eval.classifier import load_classifier  # noqa: E402
from ditkit.eval.evaluate import evaluate  # noqa: E402
from ditkit.eval.npz import save_npz  # noqa: E402
from ditkit.pipeline import default_sampling, load_pipeline, to_uint8  # noqa: E402
from ditkit.train import Trainer  # noqa: E402
from ditkit.train.posthoc import list_snapshots  # noqa: E402

# The paper's recipe (AdamW 1e-4, batch 256, EMA 0.9999, uniform t, eps + VB loss, no warm-up)
# at the model size of fmnist-cpu and the bundled model: DiT-S/4 at width 192, depth 8; sampled
# like fmnist-cpu (DPM-Solver++ 10 steps, CFG 4) so that the table compares training alone.
PAPER = dict(data_path="fashion-mnist", model="DiT-S/4", hidden_size=192, depth=8, num_heads=4, global_batch_size=256,
             lr=1e-4, ema_decay=0.9999, default_sampler="dpm++2m", default_steps=10, default_cfg_scale=4.0)  # fmt: skip
# The paper's recipe again with fmnist-fast's speed settings (bf16 autocast where it is fast, torch.compile),
# so that the table separates what the recipe buys from what the faster step buys.
PAPER_FAST = {**PAPER, "precision": "auto", "compile": True}
RECIPES = {"paper": PAPER, "paper, bf16 + compile": PAPER_FAST, "fmnist-cpu": "fmnist-cpu", "fmnist-fast": "fmnist-fast"}
# fmnist-fast with one ingredient switched back to the paper's choice (or off), for --ablate.
ABLATIONS = {
    "fmnist-fast": {},
    "- flow (eps diffusion + VB, DDIM)": dict(objective="gaussian", t_sampling="uniform", cos_loss=0.0, learn_sigma=True,
                                              default_sampler="ddim", default_steps=10, default_cfg_interval=()),  # fmt: skip
    "- logit-normal t (uniform)": dict(t_sampling="uniform"),
    "- cosine loss term": dict(cos_loss=0.0),
    "- SwiGLU (GELU MLP)": dict(mlp="gelu"),
    "- RMSNorm (LayerNorm)": dict(norm="layernorm"),
    "- RoPE (sin-cos table)": dict(pos_embed="sincos"),
    "- QK-norm": dict(qk_norm=False),
    "- high lr (1e-4, no warm-up, constant)": dict(lr=1e-4, warmup_steps=0, lr_schedule="constant"),
    "- power EMA (constant 0.9999)": dict(ema_schedule="constant", ema_decay=0.9999),
    "- guidance interval": dict(default_cfg_interval=()),
    "- bf16 + compile (fp32, eager)": dict(precision="fp32", compile=False),
    "+ x-prediction (JiT: predict the image, velocity loss)": dict(prediction="data"),
    "+ depthwise convolution in the MLP (--mlp-conv)": dict(mlp_conv=True),
    "+ post-hoc EMA length 0.05": dict(posthoc_length=0.05),
    "+ post-hoc EMA length 0.15": dict(posthoc_length=0.15),
    "+ post-hoc EMA length 0.20": dict(posthoc_length=0.20),
    # Autoguidance by the same run's EMA a quarter of the way in (no extra training), Heun 3 steps: 5 + 5 evaluations.
    "+ autoguidance by its own EMA at 1/4 of the run (Heun 3, scale 2)": dict(guide_at=0.25, guide_length=0.05, default_steps=3, default_cfg_scale=2.0,
                                                                              default_cfg_interval=()),  # fmt: skip
    "fmnist-fast, seed 1 (the spread of a rerun)": dict(global_seed=1),
}
SAMPLING_ONLY = ("default_", "posthoc_length", "guide_")  # variants that reuse fmnist-fast's model


def recipe_values(spec) -> dict:
    values = load_config_file(spec, "train") if isinstance(spec, str) else dict(spec)
    values.pop("results_dir", None)
    return values


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = raw
    return out


def posthoc_models(run: Path, change: dict, out: Path) -> tuple[Path, Path | None]:
    """(the model to sample, its autoguidance guide or None) of a sampling-only variant: the run's
    EMA of another length, and the run's EMA part of the way in as the guide (ditkit ema)."""
    steps = max(step for _, step, _ in list_snapshots(run))
    model = run / "model"
    if "posthoc_length" in change:
        model = run_ema(EMAConfig(run=str(run), length=(change["posthoc_length"],), out=str(out / "model")))[0]
    guide = None
    if "guide_at" in change:
        at = max(s for _, s, _ in list_snapshots(run) if s <= change["guide_at"] * steps)
        guide = run_ema(EMAConfig(run=str(run), length=(change["guide_length"],), step=at, out=str(out / "guide")))[0]
    return model, guide


@torch.no_grad()
def sample_and_score(model_dir: Path, out: Path, n: int, seed: int, batch: int, recipe: dict | None = None, guide: Path | None = None) -> dict:
    """Sample n images with uniform seeded labels and the model's recorded sampling (or what a run
    of `recipe` would record: its default_* settings), autoguided by `guide` if given; evaluate them."""
    pipe = load_pipeline(SampleNpzConfig(ckpt=str(model_dir), device="cpu", guide_ckpt=str(guide) if guide else "none"))
    if recipe is not None:
        s = default_sampling(pipe.objective, **{k.removeprefix("default_"): v for k, v in recipe.items() if k.startswith("default_")})
        pipe.sampling = replace(pipe.sampling, sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale, cfg_interval=s.cfg_interval)
    rows = [0]
    for network in (pipe.network, pipe.guide_network):
        if network is not None:
            network.register_forward_pre_hook(lambda m, args: rows.__setitem__(0, rows[0] + len(args[0])))
    labels = np.random.default_rng(seed).integers(0, pipe.config.num_real_classes, size=n)  # U-ViT counts its null class in num_classes
    torch.manual_seed(seed)
    start = time.perf_counter()
    images = np.concatenate([to_uint8(pipe.images(torch.from_numpy(labels[i : i + batch]))) for i in range(0, n, batch)])
    seconds = time.perf_counter() - start
    path = save_npz(out / "samples.npz", arr_0=images, labels=labels)
    metrics = evaluate(EvalConfig(samples=str(path), ref="fashion-mnist", device="cpu", batch_size=256))["metrics"]
    return {"sampling": pipe.describe_sampling(), "evals_per_sample": rows[0] / n, "sample_s": seconds, **metrics}


def train(name: str, values: dict, out: Path, minutes: float | None, steps: int | None) -> tuple[Path, dict]:
    values = {**values, "results_dir": str(out / "runs"), "sample_every": None, "num_workers": 0}
    if minutes is not None:
        values["max_minutes"] = minutes
        values.setdefault("max_steps", 10**9)
    if steps is not None:
        values["max_steps"] = steps
        values.pop("max_minutes", None)
    values = {k: v for k, v in values.items() if not k.startswith(SAMPLING_ONLY[1:])}
    values.setdefault("ckpt_every", 10**9)  # one checkpoint, at the end
    cfg = TrainConfig(**values)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    exp = trainer.run()
    return exp, {"steps": trainer.step, "images": trainer.step * cfg.global_batch_size, "train_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", action="append", help=f"recipes to run (default: {', '.join(RECIPES)}); a name or a TOML file")
    p.add_argument("--ablate", action="store_true", help="run fmnist-fast with each ingredient switched off in turn")
    p.add_argument("--only", action="append", help="with --ablate: run only the named variants (substring match)")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget per recipe")
    p.add_argument("--steps", type=int, help="a step budget instead of minutes (exploration)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE overriding every recipe (JSON values)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=64, help="samples per model batch")
    p.add_argument("--out", default="results/ttq")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ablate:
        base = {**recipe_values("fmnist-fast"), "ema_profiles": (0.05, 0.10), "ema_snapshot_every": 250}  # snapshots for the post-hoc variants
        runs = {k: {**base, **v} for k, v in ABLATIONS.items() if not args.only or any(o in k for o in args.only)}
    else:
        names = args.recipe or list(RECIPES)
        runs = {n: recipe_values(RECIPES.get(n, n)) for n in names}
    overrides = parse_sets(args.set)
    budget = None if args.steps else args.minutes
    real = evaluate(EvalConfig(samples=f"fashion-mnist-train:{args.num_samples}", ref="fashion-mnist", device="cpu", batch_size=256))["metrics"]
    classifier_acc = float(load_classifier()[1].get("test_accuracy", "nan"))
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name, values in runs.items():
        folder = out / name.replace(" ", "_").replace("/", "_")
        change = ABLATIONS.get(name, {}) if args.ablate else {}
        if change and all(k.startswith(SAMPLING_ONLY) for k in change) and "fmnist-fast" in results:  # sampling alone: fmnist-fast's model
            run = sorted((out / "fmnist-fast" / "runs").glob("*/model"))[-1].parent
            stats = {k: results["fmnist-fast"][k] for k in ("steps", "images", "train_s")}
            folder.mkdir(exist_ok=True)
            model, guide = posthoc_models(run, change, folder)
            recipe = {k: v for k, v in {**values, **overrides}.items() if not k.startswith(SAMPLING_ONLY[1:])}
            scores = sample_and_score(model, folder, args.num_samples, args.seed, args.batch, recipe=recipe, guide=guide)
        else:
            exp, stats = train(name, {**values, **overrides}, folder, budget, args.steps)
            scores = sample_and_score(exp / "model", folder, args.num_samples, args.seed, args.batch)
        results[name] = {**stats, **scores, "settings": {**values, **overrides}, "budget_minutes": budget, "date": time.strftime("%Y-%m-%d")}
        results_file.write_text(json.dumps(results, indent=2, default=str))
        print(json.dumps({name: results[name]}, default=str), flush=True)
    print(f"\n{args.num_samples} samples vs the Fashion-MNIST test set; real vs real: FD-EffNet {real['FD-EffNet']:.1f}, "
          f"accuracy {real['accuracy']:.3f}; the classifier's test accuracy {classifier_acc:.3f}")  # fmt: skip
    print(f"{'recipe':<42} {'steps':>6} {'train s':>8} {'img/s':>6} {'evals':>6} {'FD-EffNet':>9} {'x real':>6} {'acc':>6} {'acc/clf':>7}")
    for name in runs:
        r = results[name]
        print(f"{name:<42} {r['steps']:>6} {r['train_s']:>8.0f} {r['images'] / r['train_s']:>6.0f} {r['evals_per_sample']:>6.1f} "
              f"{r['FD-EffNet']:>9.1f} {r['FD-EffNet'] / real['FD-EffNet']:>6.1f} {r['accuracy']:>6.3f} {r['accuracy'] / classifier_acc:>7.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
