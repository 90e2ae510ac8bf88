"""`ditkit dpo`: Diffusion-DPO (Wallace et al. 2023) on pairs of the model's own samples, with LoRA.

For a pair (x_w preferred over x_l) of class y, one time t and one noise shared by both,

    inside = -beta / 2 * [(|e_w - f_theta(x_w)|^2 - |e_w - f_ref(x_w)|^2) - (|e_l - f_theta(x_l)|^2 - |e_l - f_ref(x_l)|^2)]
    loss   = -log sigmoid(inside)

where |.|^2 is the objective's own per-sample mean square (`training_losses(...)["mse"]`: the noise
for the paper's diffusion, the velocity for flow models), f_theta the model with the adapter and
f_ref the same model with the adapter disabled (the frozen base). A fresh adapter (B = 0) gives
inside = 0 and loss = log 2; inside > 0 means the adapter fits the winner better than the loser,
relative to the reference (the "implicit accuracy"); inside itself is the implicit reward margin.

Pairs come from a judge: any function (images (N, C, H, W) in [-1, 1], labels (N,)) -> scores (N,),
higher is better; the default is the shipped Fashion-MNIST classifier's probability of the class.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import DPOConfig, EvalConfig, SamplingOptions
from .eval.classifier import classifier_judge, classifier_predictions, load_classifier
from .eval.evaluate import evaluate
from .lora import ADAPTER_WEIGHTS, adapter_disabled, add_lora, save_adapter
from .pipeline import Pipeline, load_pipeline
from .utils.images import to_uint8
from .utils.io import atomic_write, save_npz
from .utils.runs import BUNDLED_NAME
from .utils.vae import decode, vae_factor

Judge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOG_COLUMNS = ("step", "loss", "implicit_acc", "reward_margin", "elapsed_s")


def dpo_loss(model, objective, x_w: torch.Tensor, x_l: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(mean loss, inside (N,)) of Diffusion-DPO for pairs (x_w, x_l) of labels y at times t with
    shared noise; `model` carries a LoRA adapter, and the reference is the model without it."""
    x = torch.cat([x_w, x_l])  # (2N, C, H, W): winners, then losers
    t2, noise2, y2 = t.repeat(2), noise.repeat(2, 1, 1, 1), y.repeat(2)
    mse = objective.training_losses(model, x, t2, noise=noise2, y=y2)["mse"]  # (2N,)
    with torch.no_grad(), adapter_disabled(model):
        ref = objective.training_losses(model, x, t2, noise=noise2, y=y2)["mse"]
    model_w, model_l = mse.chunk(2)
    ref_w, ref_l = ref.chunk(2)
    inside = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))  # (N,)
    return -F.logsigmoid(inside).mean(), inside.detach()


@torch.no_grad()
def sample_images(pipe: Pipeline, y: torch.Tensor, seed: int, batch_size: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents in the model's input space, images in [-1, 1]) for labels y; batch i's noise from (seed, i)."""
    latents, images = [], []
    for i, part in enumerate(tqdm(y.split(batch_size), desc=desc, leave=False)):
        g = torch.Generator(device=pipe.device).manual_seed((seed * 1_000_003 + i) % 2**63)
        z = pipe.latents(part, generator=g)
        latents.append(z.cpu())
        images.append((decode(pipe.vae, z) if pipe.vae is not None else z).float().cpu())
    return torch.cat(latents), torch.cat(images)


def make_pairs(scores: torch.Tensor, y: torch.Tensor, min_margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(winner indices, loser indices): within each class the best sample against the worst, the
    second best against the second worst, ...; each class's sample count must be even. Pairs whose
    scores differ by less than `min_margin` are dropped: two samples the judge finds about equally
    good teach the adapter the noise in the judge, not what it prefers."""
    winners, losers = [], []
    for c in y.unique():
        idx = (y == c).nonzero()[:, 0]
        ranked = idx[scores[idx].argsort(descending=True)]
        half = len(ranked) // 2
        winners.append(ranked[:half])
        losers.append(ranked[half:].flip(0)[:half])
    win, lose = torch.cat(winners), torch.cat(losers)
    keep = scores[win] - scores[lose] >= min_margin
    return win[keep], lose[keep]


def evaluate_samples(pipe: Pipeline, cfg: DPOConfig, path: Path) -> dict:
    """Unguided samples (classes cycled, fixed seed) written to `path`, and their class accuracy and
    (above 1280 samples) FD-EffNet against the Fashion-MNIST test split."""
    y = torch.arange(cfg.eval_samples) % pipe.config.num_real_classes
    _, images = sample_images(pipe, y, cfg.seed + 1, cfg.sample_batch_size, desc=f"evaluate {path.stem}")
    save_npz(path, arr_0=to_uint8(images), labels=y.numpy())
    metrics = ("accuracy", "FD-EffNet") if cfg.eval_samples > 1280 else ("accuracy",)
    return evaluate(EvalConfig(samples=str(path), ref="fashion-mnist", metrics=metrics, device=cfg.device))["metrics"]


def paired_change(before: Path, after: Path) -> dict:
    """Accuracy change between two evaluations drawn with the same labels and noise, sample by sample:
    how many samples the shipped classifier recognises only after (fixed) or only before (broken),
    and the standard error of the change, which pairing makes smaller than either accuracy's own."""
    model = load_classifier()[0]
    with np.load(before) as b, np.load(after) as a:
        labels = b["labels"]
        ok_before = classifier_predictions(model, b["arr_0"]) == labels
        ok_after = classifier_predictions(model, a["arr_0"]) == labels
    n = len(labels)
    fixed, broken = int((ok_after & ~ok_before).sum()), int((ok_before & ~ok_after).sum())
    change = (fixed - broken) / n
    return {"fixed": fixed, "broken": broken, "change": change, "paired_se": math.sqrt(max((fixed + broken) / n - change**2, 0.0) / n)}


def run_dpo(cfg: DPOConfig, judge: Judge | None = None) -> Path:
    """Sample, judge, pair, train the adapter; returns OUT/adapter. `judge` overrides the classifier."""
    out = Path(cfg.out)
    if (out / "adapter" / ADAPTER_WEIGHTS).exists():
        raise FileExistsError(f"{out / 'adapter'} already holds an adapter; pass another --out (or remove it) to run again.")
    pipe = load_pipeline(SamplingOptions(ckpt=cfg.ckpt, vae=cfg.vae, sampler=cfg.sampler, num_sampling_steps=cfg.num_sampling_steps,
                                         cfg_scale=cfg.cfg_scale, device=cfg.device))  # fmt: skip
    if pipe.config.conditioning != "class":
        raise ValueError(f"{pipe.source} is a text-to-image model, and ditkit dpo tunes class-conditional ones (its judge scores each sample "
                         "against the class it was drawn for); pass --ckpt with a class-conditional model.")  # fmt: skip
    model, objective, device = pipe.model, pipe.objective, pipe.device
    if judge is None:
        judge = classifier_judge(cfg.judge, device)
    c = pipe.config
    shape = (c.in_channels, c.input_size, c.input_size)
    if pipe.vae is not None:
        factor = vae_factor(pipe.vae)
        shape = (pipe.vae.config.out_channels, c.input_size * factor, c.input_size * factor)
    judge(torch.zeros(1, *shape, device=device), torch.full((1,), c.num_classes - 1, device=device))  # a judge that cannot score these fails before sampling
    out.mkdir(parents=True, exist_ok=True)
    print(f"dpo: {pipe.describe_source()} sampled with {pipe.describe_sampling()}, beta {cfg.beta:g}, LoRA rank {cfg.lora_rank}", flush=True)

    # 1. The model's own samples, judged, paired within each class.
    num_classes = pipe.config.num_real_classes
    y = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    latents, images = sample_images(pipe, y, cfg.seed, cfg.sample_batch_size, desc="pair samples")
    scores = torch.cat([judge(part.to(device), labels.to(device)).float().cpu() for part, labels in
                        zip(images.split(cfg.sample_batch_size), y.split(cfg.sample_batch_size))])  # fmt: skip
    win, lose = make_pairs(scores, y, cfg.min_margin)
    if not len(win):
        w, l = make_pairs(scores, y)
        raise ValueError(f"no pair of the {len(y)} samples differs by --min-margin {cfg.min_margin:g} in the judge's score (the widest gap is "
                         f"{(scores[w] - scores[l]).max():.3f}); lower it or raise --samples-per-class.")  # fmt: skip
    print(f"dpo: {len(win)} pairs from {len(y)} samples; judge score {scores.mean():.3f} on average, "
          f"winners {scores[win].mean():.3f}, losers {scores[lose].mean():.3f}", flush=True)  # fmt: skip
    report = {"settings": asdict(cfg), "pairs": len(win), "judge": {"mean": scores.mean().item(), "winners": scores[win].mean().item(), "losers": scores[lose].mean().item()}}
    if cfg.eval_samples:
        report["before"] = evaluate_samples(pipe, cfg, out / "before.npz")
        print(f"dpo: before: {json.dumps(report['before'])}", flush=True)

    # 2. The adapter, trained against the frozen model. eval(): no label dropout, as in sampling.
    base = BUNDLED_NAME if cfg.ckpt in (None, BUNDLED_NAME) and not Path(cfg.ckpt or "").is_file() else str(Path(pipe.source).resolve())
    add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, base=base)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    x_w, x_l, y_pair = latents[win], latents[lose], y[win]
    shape = tuple(x_w.shape[1:])
    start = time.perf_counter()
    with open(out / "log.csv", "w", newline="") as f, contextlib.closing(tqdm(total=cfg.steps, desc="dpo")) as bar:
        log = csv.writer(f)
        log.writerow(LOG_COLUMNS)
        running = []
        for step in range(cfg.steps):
            g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) % 2**63)  # the step's pairs, times and noise
            idx = torch.randint(len(x_w), (cfg.batch_size,), generator=g)
            t = objective.draw_t(cfg.batch_size, generator=g)
            noise = torch.randn((cfg.batch_size, *shape), generator=g)
            loss, inside = dpo_loss(model, objective, x_w[idx].to(device), x_l[idx].to(device), y_pair[idx].to(device),
                                    t.to(device), noise.to(device), cfg.beta)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append(torch.stack([loss.detach(), (inside > 0).float().mean(), inside.mean()]))
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                loss_v, acc, margin = torch.stack(running).mean(0).tolist()
                running.clear()
                if not math.isfinite(loss_v):
                    raise FloatingPointError(f"the DPO loss became {loss_v} by step {step + 1}; lower --lr or --beta.")
                log.writerow([step + 1, f"{loss_v:.6f}", f"{acc:.4f}", f"{margin:.4f}", f"{time.perf_counter() - start:.1f}"])
                f.flush()
                bar.update(step + 1 - bar.n)
                bar.set_postfix(loss=f"{loss_v:.4f}", acc=f"{acc:.2f}", margin=f"{margin:.3f}")
    adapter = save_adapter(model, out / "adapter", pipe.config)

    if cfg.eval_samples:
        report["after"] = evaluate_samples(pipe, cfg, out / "after.npz")
        for name in report["before"]:
            print(f"dpo: {name:<10} before {report['before'][name]:.4f}  after {report['after'][name]:.4f}", flush=True)
        if "accuracy" in report["after"]:  # the accuracy metric's classifier, sample by sample
            report["paired"] = pc = paired_change(out / "before.npz", out / "after.npz")
            print(f"dpo: accuracy change {pc['change']:+.4f} ± {pc['paired_se']:.4f} (paired): {pc['fixed']} samples fixed, {pc['broken']} broken", flush=True)
    atomic_write(out / "report.json", lambda p: Path(p).write_text(json.dumps(report, indent=2) + "\n"))
    print(f"dpo: wrote {adapter} (ditkit sample --lora {adapter} --cfg-scale 1)", flush=True)
    return adapter
