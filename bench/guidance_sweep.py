"""Guidance for a trained model, measured: FD-EffNet against class accuracy over guidance scales,
with and without a guidance interval, at one sampler and step count; a table and a plot.

    python bench/guidance_sweep.py --ckpt ditkit/assets/fashion-mnist --sampler heun2 --steps 5 \\
        --scales 1 1.5 2 3 4 --intervals none 0.1,1 0.3,1 --out docs/guidance

Each point samples N images with uniform seeded labels (the same labels and noise for every point)
and scores them against the Fashion-MNIST test set; `evals` counts network rows per sample
(a guided evaluation is two: cond and null). Resumable: finished points are kept in OUT/guidance.json.
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


def parse_interval(text: str):
    return None if text == "none" else tuple(float(v) for v in text.split(","))


def plot(points: dict, out: Path, real_fd: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for interval in sorted({p["interval"] for p in points.values()}):
        pts = sorted((p["scale"], p["fd"], p["accuracy"]) for p in points.values() if p["interval"] == interval)
        scale, fd, acc = zip(*pts)
        ax.plot(acc, fd, marker="o", label="guidance on all steps" if interval == "none" else f"guidance for t in [{interval.replace(',', ', ')}]")
        for s, f, a in pts:
            ax.annotate(f"{s:g}", (a, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if real_fd:
        ax.axhline(real_fd, color="gray", ls=":", lw=1, label="real vs real")
    ax.set_xlabel("class accuracy (shipped classifier)")
    ax.set_ylabel("FD-EffNet (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    points = json.loads(file.read_text()).get("points", {}) if file.exists() else {}
    pipe = load_pipeline(SampleNpzConfig(ckpt=args.ckpt, device="cpu", sampler=args.sampler, num_sampling_steps=args.steps,
                                          compile=args.compile))
    sampler, steps = pipe.sampling.sampler, pipe.sampling.steps
    for interval_text in args.intervals:
        for scale in args.scales:
            key = f"{sampler}|{steps}|{scale:g}|{interval_text}"
            if key in points or (scale == 1.0 and interval_text != "none"):
                continue
            pipe.sampling = replace(pipe.sampling, cfg_scale=scale)
            r = run_point(pipe, sampler, steps, parse_interval(interval_text), args.num_samples, args.seed, args.batch, out / "tmp.npz")
            points[key] = {"sampler": sampler, "steps": steps, "scale": scale, "interval": interval_text, **r}
            file.write_text(json.dumps({"ckpt": args.ckpt, "num_samples": args.num_samples, "points": points}, indent=2))
            print(key, json.dumps(points[key]), flush=True)
    (out / "tmp.npz").unlink(missing_ok=True)
    for p_ in list(points.values()):  # the unguided point belongs to every interval's curve
        if p_["scale"] == 1.0:
            for interval_text in args.intervals:
                points.setdefault(f"{sampler}|{steps}|1|{interval_text}", {**p_, "interval": interval_text})
    plot(points, out, args.real_fd, f"{sampler}, {steps} steps, {args.num_samples} samples")
    lines = ["| scale | guidance | evals/sample | FD-EffNet | accuracy |", "|---|---|---|---|---|"]
    for p_ in sorted(points.values(), key=lambda p_: (p_["interval"], p_["scale"])):
        lines.append(f"| {p_['scale']:g} | {'all steps' if p_['interval'] == 'none' else 't in [' + p_['interval'].replace(',', ', ') + ']'} | "
                     f"{p_['forwards']:.0f} | {p_['fd']:.1f} | {p_['accuracy']:.3f} |")
    (out / "guidance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
