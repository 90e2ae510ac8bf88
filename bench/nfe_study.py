"""Samplers against model evaluations: FD-EffNet and class accuracy of N samples at 5, 10, 25 and
50 NFE for the diffusion samplers (ddim, dpm++2m, unipc) on a model trained with the paper's
diffusion and the flow samplers (euler, heun2, dopri5, sde-euler) on the same model trained with
flow matching, each with and without a guidance interval; 250-step DDPM as the reference.

    ditkit train --config fmnist-cpu --results-dir results/nfe-gaussian
    ditkit train --config fmnist-cpu --objective flow --results-dir results/nfe-flow
    python bench/nfe_study.py --gaussian results/nfe-gaussian/000-DiT-S-4/model \\
        --flow results/nfe-flow/000-DiT-S-4/model --out docs/samplers

NFE counts solver evaluations of the network (a guided evaluation runs cond and null as one batch
and counts once); `forwards` counts per-sample rows through the network (guided: 2). dopri5
chooses its own steps: it runs at three tolerances and reports the NFE it used. Resumable: each
finished point is kept in OUT/nfe.json and skipped when run again.
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

from ditkit.config import EvalConfig, SampleNpzConfig  # noqa: E402
from ditkit.eval.evaluate import evaluate  # noqa: E402
from ditkit.eval.npz import save_npz  # noqa: E402
from ditkit.pipeline import load_pipeline, to_uint8  # noqa: E402
from ditkit.samplers import sample  # noqa: E402

NFES = (5, 10, 25, 50)
GAUSSIAN = ("ddim", "dpm++2m", "unipc")
FLOW = ("euler", "heun2", "dopri5", "sde-euler")
EXTRA = ("heun", "sde-heun")  # on request (--samplers)
DOPRI_TOLERANCES = (1e-1, 1e-2, 1e-3)  # rtol (atol = rtol / 10); SiT's default is rtol 1e-3, atol 1e-6


def steps_for(sampler: str, nfe: int) -> int:
    """Solver steps that spend `nfe` evaluations: Heun two per step (EDM's heun one fewer in all),
    the SDEs one more for their last step."""
    return {"heun2": max(1, nfe // 2), "heun": max(1, (nfe + 1) // 2), "sde-euler": max(1, nfe - 1), "sde-heun": max(1, (nfe - 1) // 2)}.get(sampler, nfe)


@torch.no_grad()
def run_point(pipe, sampler: str, steps: int, interval, n: int, seed: int, batch: int, tmp: Path, prompts: list[str] | None = None, **options) -> dict:
    """One point: n samples, their evaluations and seconds, FD-EffNet and accuracy. A text model
    takes `prompts` (sample i gets prompt i mod P, as in sample-npz); its accuracy is the class
    accuracy over all scored prompts, with each group's in "groups" and its attribute accuracy
    (brightness and size as measured) in "attributes"."""
    pipe.sampling = replace(pipe.sampling, sampler=sampler, steps=steps, cfg_interval=interval)
    calls, rows = [0], [0]

    def count(module, args):
        calls[0] += 1
        rows[0] += len(args[0])

    hook = pipe.network.register_forward_pre_hook(count)
    guide_calls, guide_rows = [0], [0]
    guide = getattr(pipe, "guide_network", None)  # autoguidance: the guide's evaluations count too

    def count_guide(module, args):
        guide_calls[0] += 1
        guide_rows[0] += len(args[0])

    guide_hook = guide.register_forward_pre_hook(count_guide) if guide is not None else None
    if pipe.text_encoder is not None:
        if not prompts:
            raise ValueError("this is a text-to-image model; pass the prompts to sample (e.g. --prompts fashion-mnist-captions).")
        labels = np.array([prompts[i % len(prompts)] for i in range(n)])
    else:
        labels = np.random.default_rng(seed).integers(0, pipe.config.num_real_classes, size=n)  # U-ViT counts its null class in num_classes
    torch.manual_seed(seed)
    start = time.perf_counter()
    images = []
    for i in range(0, n, batch):
        y = pipe.condition(labels[i : i + batch].tolist()) if prompts else torch.from_numpy(labels[i : i + batch])
        if options:  # solver tolerances: straight to the sampler
            s = pipe.sampling
            z = sample(pipe.network, pipe.objective, pipe.noise(len(y)), y, sampler=s.sampler, steps=s.steps, cfg_scale=s.cfg_scale,
                       cfg_interval=s.cfg_interval, precision=s.precision, clip_denoised=True, **options)  # fmt: skip
        else:
            z = pipe.images(y)
        images.append(to_uint8(z))
    seconds = time.perf_counter() - start
    hook.remove()
    if guide_hook is not None:
        guide_hook.remove()
    batches = -(-n // batch)
    path = save_npz(tmp, arr_0=np.concatenate(images), **({"prompts": labels} if prompts else {"labels": labels}))
    result = evaluate(EvalConfig(samples=str(path), ref="fashion-mnist", device="cpu", batch_size=256))
    metrics, follow = result["metrics"], result.get("prompt_following")
    guided = {"guide_nfe": guide_calls[0] / batches, "guide_forwards": guide_rows[0] / n} if guide is not None else {}
    if follow:  # text: class accuracy over every scored prompt, and per group (seen, unseen, held-out)
        groups = {g: r for g, r in follow.items() if "class_accuracy" in r}
        accuracy = sum(r["class_accuracy"] * r["prompts"] for r in groups.values()) / sum(r["prompts"] for r in groups.values())
        guided["groups"] = {g: r["class_accuracy"] for g, r in groups.items()}
        guided["attributes"] = {g: r["attribute_accuracy"] for g, r in groups.items()}
    else:
        accuracy = metrics["accuracy"]
    return {"nfe": calls[0] / batches, "forwards": rows[0] / n, **guided, "seconds": seconds, "fd": metrics["FD-EffNet"], "accuracy": accuracy}


def plot(results: dict, out: Path, reference: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = dict(zip(GAUSSIAN + FLOW + EXTRA, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for sampler in GAUSSIAN + FLOW + EXTRA:
        for interval, style in (("none", "-"), ("interval", "--")):
            pts = sorted((r["nfe"], r["fd"], r["accuracy"]) for k, r in results.items() if r["sampler"] == sampler and r["guidance"] == interval)
            if not pts:
                continue
            nfe, fd, acc = zip(*pts)
            label = f"{sampler}{' + interval' if interval == 'interval' else ''} ({'diffusion' if sampler in GAUSSIAN else 'flow'} model)"
            marker = "o" if interval == "none" else "s"
            axes[0].plot(nfe, fd, style, marker=marker, color=colors[sampler], label=label)
            axes[1].plot(nfe, acc, style, marker=marker, color=colors[sampler])
    for key, r in reference.items():
        axes[0].axhline(r["fd"], color="gray", ls=":", lw=1)
        axes[0].annotate(key, (50, r["fd"]), fontsize=7, color="gray", ha="right", va="bottom")
    for ax, name in zip(axes, ("FD-EffNet (lower is better)", "class accuracy")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log-scale minor labels would crowd the NFE ticks
        ax.set_xticks(NFES, [str(n) for n in NFES])
        ax.set_xlabel("NFE (guided evaluations batched)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=6.5, ncol=2)
    fig.suptitle("Samplers on two fmnist-cpu models (diffusion and flow objective, same steps): dashed / single points = guidance interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "nfe.png", dpi=130)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gaussian", required=True, help="model folder trained with the paper's diffusion")
    p.add_argument("--flow", required=True, help="the same model trained with flow matching")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--interval", type=float, nargs=2, default=(0.2, 1.0), help="the guidance interval (t = 0 noise, 1 data)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=64, help="samples per batch (on a CPU small batches stay in cache: 64 runs twice as fast as 500)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (about 1.5x on a CPU)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16 autocast of the networks (2.6x with --compile on a CPU with AMX)")
    p.add_argument("--nfe", type=int, nargs="*", default=NFES)
    p.add_argument("--samplers", nargs="*", default=GAUSSIAN + FLOW, choices=GAUSSIAN + FLOW + EXTRA, help="a subset to run")
    p.add_argument("--guidance", nargs="*", default=("none", "interval"), choices=("none", "interval"), help="guided at all steps, in the interval, or both")
    p.add_argument("--dopri-rtol", type=float, nargs="*", default=DOPRI_TOLERANCES, help="dopri5's tolerances (rtol; atol = rtol / 10), loosest first")
    p.add_argument("--out", default="docs/samplers")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "nfe.json"
    saved = json.loads(file.read_text()) if file.exists() else {}
    results, reference = saved.get("points", {}), saved.get("reference", {})
    tmp = Path("results") / "nfe-samples.npz"
    tmp.parent.mkdir(exist_ok=True)

    def save():
        file.write_text(json.dumps({"settings": vars(args), "reference": reference, "points": results}, indent=2))

    pipes = {kind: load_pipeline(SampleNpzConfig(ckpt=path, device="cpu", cfg_scale=args.cfg_scale, compile=args.compile, precision=args.precision)) for kind, path in
             (("gaussian", args.gaussian), ("flow", args.flow))}  # fmt: skip
    common = dict(n=args.num_samples, seed=args.seed, batch=args.batch, tmp=tmp)
    if "ddpm-250" not in reference:
        reference["ddpm-250"] = run_point(pipes["gaussian"], "ddpm", 250, None, **common)
        save()
    plan = []  # (order, point): every sampler at the first --nfe, then the next, so a cut-short run has whole columns
    for sampler in args.samplers:
        kind = "gaussian" if sampler in GAUSSIAN else "flow"
        for guidance, interval in [g for g in (("none", None), ("interval", tuple(args.interval))) if g[0] in args.guidance]:
            if sampler == "dopri5":  # its loosest tolerance beside the first NFE column, its tightest beside the last
                plan += [(i * len(args.nfe) // len(args.dopri_rtol), (kind, sampler, 1, guidance, interval, {"rtol": tol, "atol": tol / 10}))
                         for i, tol in enumerate(args.dopri_rtol)]  # fmt: skip
            else:
                plan += [(i, (kind, sampler, steps_for(sampler, n), guidance, interval, {})) for i, n in enumerate(args.nfe)]
    for _, (kind, sampler, steps, guidance, interval, options) in sorted(plan, key=lambda p: p[0]):
        key = f"{sampler}|{steps}|{guidance}|{options.get('rtol', '')}"
        if key in results:
            continue
        r = run_point(pipes[kind], sampler, steps, interval, **common, **options)
        results[key] = {"sampler": sampler, "steps": steps, "guidance": guidance, **options, **r}
        save()
        print(key, json.dumps(results[key]), flush=True)
    plot(results, out, reference)
    ref = reference["ddpm-250"]
    lines = ["| sampler | model | guidance | steps | NFE | forwards/sample | FD-EffNet | vs DDPM-250 | accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| ddpm (reference) | diffusion | all steps | 250 | 250 | {ref['forwards']:.0f} | {ref['fd']:.1f} | 1.00 | {ref['accuracy']:.3f} |")
    for r in sorted(results.values(), key=lambda r: ((GAUSSIAN + FLOW + EXTRA).index(r["sampler"]), r["guidance"], r["nfe"])):
        model = "diffusion" if r["sampler"] in GAUSSIAN else "flow"
        lines.append(f"| {r['sampler']} | {model} | {'t in [%g, %g]' % tuple(args.interval) if r['guidance'] == 'interval' else 'all steps'} | "
                     f"{r['steps'] if r['sampler'] != 'dopri5' else 'rtol %g' % r['rtol']} | {r['nfe']:.0f} | {r['forwards']:.0f} | "
                     f"{r['fd']:.1f} | {r['fd'] / ref['fd']:.2f} | {r['accuracy']:.3f} |")  # fmt: skip
    (out / "nfe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
