"""Guidance for a trained model, measured: FD-EffNet against class accuracy over guidance scales,
for classifier-free guidance (on all steps, or in an interval) and for autoguidance by weaker
models of the same data, at one sampler and step count; a table and a plot.

    python bench/guidance_sweep.py --ckpt ditkit/assets/fashion-mnist --sampler heun --steps 5 \\
        --scales 1 1.5 2 3 4 --intervals none 0.1,1 0.3,1 --out docs/guidance
    python bench/guidance_sweep.py --ckpt bundled --sampler heun --steps 3 --scales 1.5 2 3 \\
        --intervals none --guide small-1k=RUN/checkpoints/0001000.pt --out docs/guidance/auto

Each point samples N images with uniform seeded labels (the same labels and noise for every point)
and scores them against the Fashion-MNIST test set. A text-to-image model samples the prompts of
--prompts instead (default: the fashion-mnist-captions suites, sample i takes prompt i mod P, as
in sample-npz); its accuracy is the class accuracy over every prompt, and the table adds each
group's (seen and unseen phrasings, held-out pairs), then each group's attribute accuracy:

    python bench/guidance_sweep.py --ckpt fashion-mnist-text --sampler heun --steps 5 \\
        --scales 1 2 3 4 --intervals none 0.1,1 --num-samples 1500 --out docs/guidance/text

`evals` counts network evaluations per sample (a classifier-free guided evaluation runs cond and
null as one batch and counts once, two rows; autoguidance runs the model and the guide: two
evaluations, one row each), `rows` network rows per sample. Resumable: finished points are kept in OUT/guidance.json. `--guide none` (the default)
is classifier-free guidance.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.nfe_study import run_point  # noqa: E402
from ditkit.config import SampleNpzConfig  # noqa: E402
from ditkit.pipeline import load_pipeline  # noqa: E402
from ditkit.text.prompts import GROUPS, read_prompts  # noqa: E402


def parse_interval(text: str):
    return None if text == "none" else tuple(float(v) for v in text.split(","))


def curve_name(guide: str, interval: str, apg: float | None = None) -> str:
    what = ("CFG" if guide == "none" else f"autoguidance by {guide}") + ("" if apg is None else f" + APG eta {apg:g}")
    return what + (" on all steps" if interval == "none" else f" for t in [{interval.replace(',', ', ')}]")


def curve(p: dict) -> tuple:
    return p.get("guide", "none"), p["interval"], p.get("apg_eta")


def plot(points: dict, out: Path, real_fd: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    curves = sorted({curve(p) for p in points.values()}, key=str)
    for guide, interval, apg in curves:
        pts = sorted((p["scale"], p["fd"], p["accuracy"]) for p in points.values() if curve(p) == (guide, interval, apg))
        scale, fd, acc = zip(*pts)
        ax.plot(acc, fd, marker="o" if guide == "none" else "s", ls="-" if interval == "none" else "--", label=curve_name(guide, interval, apg))
        for s, f, a in pts:
            ax.annotate(f"{s:g}", (a, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if real_fd:
        ax.axhline(real_fd, color="gray", ls=":", lw=1, label="real vs real")
    ax.set_xlabel("class accuracy (shipped classifier)")
    ax.set_ylabel("FD-EffNet (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: guidance scale (labels) against quality and class fidelity", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "guidance.png", dpi=130)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--sampler")
    p.add_argument("--steps", type=int)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--intervals", nargs="+", default=["none", "0.1,1", "0.3,1"])
    p.add_argument("--guide", action="append", default=[], metavar="NAME=CKPT",
                   help="autoguidance by this weaker model (repeat for more; 'none': classifier-free guidance, the default)")
    p.add_argument("--apg-eta", type=float, help="APG: keep this fraction of the update parallel to the predicted image (default: plain guidance)")
    p.add_argument("--prompts", default="fashion-mnist-captions", help="a text-to-image model's prompts: a suite or a file (sample i takes prompt i mod P)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--real-fd", type=float, help="real-vs-real FD-EffNet at the same sample count, drawn as a line")
    p.add_argument("--out", default="docs/guidance")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "guidance.json"
    saved = json.loads(file.read_text()) if file.exists() else {}
    points, guides = saved.get("points", {}), saved.get("guides", {})
    for spec in args.guide or ["none"]:
        name, _, path = spec.partition("=")
        if name != "none":
            guides[name] = path
        variant = load_pipeline(SampleNpzConfig(ckpt=args.ckpt, device="cpu", sampler=args.sampler, num_sampling_steps=args.steps,
                                                guide_ckpt=path or "none", apg_eta=args.apg_eta, compile=args.compile))  # checks the guide against the model
        sampler, steps = variant.sampling.sampler, variant.sampling.steps
        prompts = read_prompts(args.prompts) if variant.text_encoder is not None else None  # a text-to-image model's
        for interval_text in args.intervals:
            for scale in args.scales:
                key = f"{sampler}|{steps}|{scale:g}|{interval_text}" + ("" if name == "none" else f"|{name}") + ("" if args.apg_eta is None else f"|apg{args.apg_eta:g}")
                unguided_done = any(q["scale"] == 1.0 and (q["sampler"], q["steps"]) == (sampler, steps) for q in points.values())
                if key in points or (scale == 1.0 and unguided_done):  # scale 1 is the same unguided point on every curve: drawn once
                    continue
                variant.sampling = replace(variant.sampling, cfg_scale=scale)
                r = run_point(variant, sampler, steps, parse_interval(interval_text), args.num_samples, args.seed, args.batch, out / "tmp.npz", prompts=prompts)
                points[key] = {"sampler": sampler, "steps": steps, "scale": scale, "interval": interval_text, "guide": name, "apg_eta": args.apg_eta, **r}
                file.write_text(json.dumps({"ckpt": args.ckpt, "num_samples": args.num_samples, "guides": guides, "points": points}, indent=2))
                print(key, json.dumps(points[key]), flush=True)
    (out / "tmp.npz").unlink(missing_ok=True)
    curves = {curve(p_) for p_ in points.values()}
    for p_ in [p_ for p_ in points.values() if p_["scale"] == 1.0]:  # the unguided point belongs to every curve
        for guide, interval_text, apg in curves:
            key = f"{sampler}|{steps}|1|{interval_text}" + ("" if guide == "none" else f"|{guide}") + ("" if apg is None else f"|apg{apg:g}")
            points.setdefault(key, {**p_, "interval": interval_text, "guide": guide, "apg_eta": apg})
    plot(points, out, args.real_fd, f"{sampler}, {steps} steps, {args.num_samples} samples")
    groups = sorted({g for p_ in points.values() for g in p_.get("groups", {})}, key=GROUPS.index)  # a text model's prompt groups
    attributes = [g for g in groups if any(g in p_.get("attributes", {}) for p_ in points.values())]
    lines = ["| guidance | scale | t in | evals/sample | rows/sample | FD-EffNet | accuracy |" + "".join(f" {g} |" for g in groups)
             + "".join(f" attributes, {g} |" for g in attributes), "|---|---|---|---|---|---|---|" + "---|" * (len(groups) + len(attributes))]  # fmt: skip
    for p_ in sorted(points.values(), key=lambda p_: (str(curve(p_)), p_["scale"])):
        guide, _, apg = curve(p_)
        what = "none" if p_["scale"] == 1 else curve_name(guide, "none", apg).removesuffix(" on all steps")
        evals, rows = p_["nfe"] + p_.get("guide_nfe", 0), p_["forwards"] + p_.get("guide_forwards", 0)
        lines.append(f"| {what} | {p_['scale']:g} | {'all' if p_['interval'] == 'none' else '[' + p_['interval'].replace(',', ', ') + ']'} | "
                     f"{evals:.0f} | {rows:.0f} | {p_['fd']:.1f} | {p_['accuracy']:.3f} |" + "".join(f" {p_['groups'][g]:.3f} |" for g in groups)
                     + "".join(f" {p_['attributes'][g]:.3f} |" if g in p_.get("attributes", {}) else " |" for g in attributes))  # fmt: skip
    if guides:
        lines += ["", "Guides: " + "; ".join(f"{k} = `{v}`" for k, v in sorted(guides.items()))]
    (out / "guidance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
