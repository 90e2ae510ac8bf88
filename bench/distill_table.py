"""Students of `ditkit distill` against their teacher: FD-EffNet, class accuracy and the second judge's
accuracy (scripts/second_judge.py) of N samples from the teacher at its default sampling (the reference)
and at 1, 2 and 4 guided Euler steps, the guidance student at the teacher's default sampling (one pass
per evaluation instead of two), and each few-step student at 1, 2 and 4 Euler steps (or its own
sampler: --own-sampler). Fashion-MNIST models (32x32x1): the reference set is its test split.

    python bench/distill_table.py --teacher results/flow/000-DiT-S-2/model \\
        --guidance results/distill/000-distill-guidance \\
        --student progressive=results/distill/001-distill-progressive \\
        --student add=results/distill/003-distill-add \\
        --student meanflow=results/meanflow/000-DiT-S-4 --own-sampler meanflow --out docs/distill

A student run folder is sampled at k steps by its RUN/model-kstep where there is one (the progressive
phase trained for k steps), else by its model/. NFE counts network evaluations (a guided one runs cond
and null as one batch and counts once); forwards counts per-sample rows through the network (guided: 2);
images/s is the sampling throughput of the point (eager, batches of --batch, on --device): measure it
apart from the quality, with the CPU to itself, by running the same command again with --speed
(--speed-samples per point, no evaluation). Each point's samples are kept in results/distill-samples/ for
the second judge, whose MLP is trained once per call. --recorded FILE carries points of an earlier
distill.json whose models are not at hand (their images/s from that file's machine, no second judge).
The goals of issue 25 are checked in the last column: at 1 step FD-EffNet within 1.2x of the teacher's
and accuracy >= 0.95; at 4 steps FD-EffNet at or below the teacher's; the guidance student (issue 12)
within 5% of the teacher's FD-EffNet and accuracy. Resumable: each finished point is kept in
OUT/distill.json and skipped when run again.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from nfe_study import run_point  # noqa: E402
from second_judge import accuracy, train_mlp  # noqa: E402

from ditkit.config import SampleNpzConfig  # noqa: E402
from ditkit.eval.npz import read_images  # noqa: E402
from ditkit.pipeline import find_checkpoint, load_pipeline  # noqa: E402

STEPS = (1, 2, 4)


def student_checkpoint(path: str, steps: int) -> str:
    """RUN/model-{steps}step of a progressive run where it exists, else what --ckpt PATH means."""
    phase = Path(path) / f"model-{steps}step"
    return str(phase if phase.is_dir() else find_checkpoint(path))


def goal(name: str, r: dict, ref: dict) -> str:
    """Whether a point meets its goal (guidance: issue 12's; few steps: issue 25's), or '' where none applies."""
    if name == "guidance":
        ok = r["fd"] <= 1.05 * ref["fd"] and r["accuracy"] >= 0.95 * ref["accuracy"]
    elif name != "teacher" and r["steps"] == 4:
        ok = r["fd"] <= ref["fd"]
    elif name != "teacher" and r["steps"] == 1:
        ok = r["fd"] <= 1.2 * ref["fd"] and r["accuracy"] >= 0.95
    else:
        return ""
    return "yes" if ok else "no"


def images_per_s(pipe, n: int, batch: int, seed: int) -> float:
    """Sampling throughput alone: n images in batches, no evaluation (after one warm-up batch)."""
    labels = torch.from_numpy(np.random.default_rng(seed).integers(0, pipe.config.num_real_classes, size=n))
    torch.manual_seed(seed)
    pipe.images(labels[:batch])
    start = time.perf_counter()
    for i in range(0, n, batch):
        pipe.images(labels[i : i + batch])
    return n / (time.perf_counter() - start)


def second_judge(points: dict, out: Path, seed: int) -> None:
    """The pixel MLP's accuracy on each point's samples that has none yet (one training per call)."""
    todo = [r for r in points.values() if "judge2" not in r and "npz" in r and Path(r["npz"]).exists()]  # carried points have none
    if not todo:
        return
    model, test = train_mlp(8, seed)
    for r in todo:
        samples = read_images(r["npz"])
        r["judge2"], r["judge2_test"] = accuracy(model, np.concatenate(list(samples.batches(4096))), samples.labels), test


def plot(points: dict, ref: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = sorted({r["model"] for r in points.values() if r["model"] != "guidance"}, key=lambda n: (n != "teacher", n))
    palette = [c for c in plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2] if c != plt.get_cmap("tab20").colors[14]]  # no gray: the teacher's
    for i, name in enumerate(names):
        pts = sorted((r["steps"], r["fd"], r["accuracy"], r.get("judge2", float("nan"))) for r in points.values() if r["model"] == name)
        steps, fd, acc, judge2 = zip(*pts)
        style = dict(ls="--", color="gray") if name == "teacher" else dict(color=palette[i % len(palette)])
        label = f"{name} (Euler)" if name == "teacher" else name
        for ax, values in zip(axes, (fd, acc, judge2)):
            ax.plot(steps, values, marker="o", label=label, **style)
    lines = [("teacher, its default", ref, "k")] + [(f"guidance student, {r['nfe']:.0f} NFE", r, "tab:purple") for r in points.values() if r["model"] == "guidance"]
    for label, r, color in lines:
        for ax, key in zip(axes, ("fd", "accuracy", "judge2")):
            if key in r:
                ax.axhline(r[key], color=color, ls=":", lw=1, label=label)
    axes[0].axhline(1.2 * ref["fd"], color="tab:red", lw=0.8, alpha=0.5, label="1.2x the teacher (1-step goal)")
    axes[1].axhline(0.95, color="tab:red", lw=0.8, alpha=0.5)
    for ax, label in zip(axes, ("FD-EffNet (lower is better)", "class accuracy (shipped classifier)", "class accuracy (second judge, pixel MLP)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(STEPS, [str(s) for s in STEPS])
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("ditkit distill: few-step students against their flow teacher", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "distill.png", dpi=130)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the flow teacher (model folder or run folder)")
    p.add_argument("--guidance", help="a guidance student (ditkit distill --method guidance): model folder or run folder")
    p.add_argument("--student", action="append", default=[], metavar="NAME=PATH", help="a few-step student and its name; repeat for more")
    p.add_argument("--own-sampler", nargs="*", default=[], metavar="NAME", help="students sampled with their recorded sampler instead of Euler (MeanFlow)")
    p.add_argument("--recorded", help="an earlier distill.json whose points are carried over where this call has none of the same key")
    p.add_argument("--steps", type=int, nargs="*", default=STEPS, help="Euler steps of the few-step points")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per point (FD-EffNet is full rank above 1280)")
    p.add_argument("--speed", action="store_true", help="only measure images/s of every point again (run it alone on the CPU)")
    p.add_argument("--speed-samples", type=int, default=512, help="images per point for --speed")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="docs/distill")
    args = p.parse_args()
    students = dict(s.split("=", 1) for s in args.student)
    if any(not k or not v for k, v in students.items()) or len(students) != len(args.student):
        p.error("--student takes NAME=PATH, one distinct name each.")
    if set(args.own_sampler) - set(students):
        p.error(f"--own-sampler names {', '.join(sorted(set(args.own_sampler) - set(students)))}, which no --student names.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "distill.json"
    points = json.loads(file.read_text())["points"] if file.exists() else {}
    samples = Path("results") / "distill-samples" / out.name  # each point's samples, for the second judge
    samples.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        file.write_text(json.dumps({"settings": vars(args), "points": points}, indent=2) + "\n")

    def point(key: str, name: str, ckpt: str, sampler: str | None = None, steps: int | None = None) -> None:
        if key in points and not (args.speed and "recorded" not in points[key]):
            return
        pipe = load_pipeline(SampleNpzConfig(ckpt=ckpt, device=args.device))
        s = pipe.sampling
        pipe.sampling = replace(s, sampler=sampler or s.sampler, steps=steps or s.steps)
        if args.speed:
            if key in points:
                points[key]["images_per_s"] = images_per_s(pipe, args.speed_samples, args.batch, args.seed)
                save()
                print(key, f"{points[key]['images_per_s']:.1f} images/s", flush=True)
            return
        npz = samples / f"{key.replace('|', '-')}.npz"
        try:
            r = run_point(pipe, pipe.sampling.sampler, pipe.sampling.steps, pipe.sampling.cfg_interval, n=args.num_samples, seed=args.seed, batch=args.batch, tmp=npz)
        except ValueError as e:  # a sampler of fixed steps (MeanFlow's 1 or 2) refuses the others
            print(f"{key}: skipped ({e})", flush=True)
            return
        points[key] = {"model": name, "ckpt": ckpt, "sampler": pipe.sampling.sampler, "steps": pipe.sampling.steps, "cfg_scale": s.cfg_scale, "npz": str(npz), **r}
        save()
        print(key, json.dumps(points[key]), flush=True)

    teacher = str(find_checkpoint(args.teacher))
    point("teacher|default", "teacher-default", teacher)
    for k in args.steps:
        point(f"teacher|{k}", "teacher", teacher, "euler", k)
    if args.guidance:
        point("guidance|default", "guidance", str(find_checkpoint(args.guidance)))
    for name, path in students.items():
        for k in args.steps:
            point(f"{name}|{k}", name, student_checkpoint(path, k), None if name in args.own_sampler else "euler", k)
    if args.recorded:
        for key, r in json.loads(Path(args.recorded).read_text())["points"].items():
            if key not in points:
                points[key] = {**r, "recorded": args.recorded}
    if not args.speed:
        second_judge(points, out, seed=0)
    save()

    ref = points["teacher|default"]
    rows = ["| model | sampler | steps | cfg | NFE | forwards/sample | images/s | FD-EffNet | vs teacher | accuracy | second judge | goal met |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in points.values():
        name = "teacher" if r["model"] == "teacher-default" else r["model"]
        speed = r.get("images_per_s", args.num_samples / r["seconds"])
        mark = "*" if "recorded" in r else ""
        judge2 = f"{r['judge2']:.3f}" if "judge2" in r else "-"
        rows.append(f"| {r['model']}{mark} | {r['sampler']} | {r['steps']} | {r['cfg_scale']:g} | {r['nfe']:.0f} | {r['forwards']:.0f} | "
                    f"{speed:.0f}{mark} | {r['fd']:.1f} | {r['fd'] / ref['fd']:.2f} | {r['accuracy']:.3f} | {judge2} | {goal(name, r, ref)} |")  # fmt: skip
    if any("recorded" in r for r in points.values()):
        rows.append(f"\n\\* carried from {args.recorded} (its models are not at hand here): images/s of that file's machine, no second judge.")
    (out / "distill.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    plot({k: v for k, v in points.items() if v["model"] != "teacher-default"}, ref, out)


if __name__ == "__main__":
    main()
