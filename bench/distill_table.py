"""Students of `ditkit distill` against their teacher: FD-EffNet and class accuracy of N samples from
the teacher at its default sampling (the reference) and at 1, 2 and 4 guided Euler steps, the guidance
student at the teacher's default sampling (one pass per evaluation instead of two), and each few-step
student at 1, 2 and 4 Euler steps. Fashion-MNIST models (32x32x1): the reference set is its test split.

    python bench/distill_table.py --teacher results/flow/000-DiT-S-2/model \\
        --guidance results/distill/000-distill-guidance \\
        --student progressive=results/distill/001-distill-progressive \\
        --student reflow=results/distill/002-distill-reflow --out docs/distill

A student run folder is sampled at k steps by its RUN/model-kstep where there is one (the progressive
phase trained for k steps), else by its model/. NFE counts network evaluations (a guided one runs cond
and null as one batch and counts once); forwards counts per-sample rows through the network (guided: 2);
images/s is the sampling throughput of the point (eager, batches of --batch, on --device).
The goals of issue 12 are checked in the last column: guidance within 5% of the teacher's FD-EffNet and
accuracy; at 4 steps FD-EffNet within 1.5x of the teacher's and accuracy >= 0.90; at 1 step accuracy
>= 0.85. Resumable: each finished point is kept in OUT/distill.json and skipped when run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nfe_study import run_point  # noqa: E402

from ditkit.config import SampleNpzConfig  # noqa: E402
from ditkit.pipeline import find_checkpoint, load_pipeline  # noqa: E402

STEPS = (1, 2, 4)


def student_checkpoint(path: str, steps: int) -> str:
    """RUN/model-{steps}step of a progressive run where it exists, else what --ckpt PATH means."""
    phase = Path(path) / f"model-{steps}step"
    return str(phase if phase.is_dir() else find_checkpoint(path))


def goal(name: str, r: dict, ref: dict) -> str:
    """Whether a point meets issue 12's goal for its kind, or '' where none applies."""
    if name == "guidance":
        ok = r["fd"] <= 1.05 * ref["fd"] and r["accuracy"] >= 0.95 * ref["accuracy"]
    elif name != "teacher" and r["steps"] == 4:
        ok = r["fd"] <= 1.5 * ref["fd"] and r["accuracy"] >= 0.90
    elif name != "teacher" and r["steps"] == 1:
        ok = r["accuracy"] >= 0.85
    else:
        return ""
    return "yes" if ok else "no"


def plot(points: dict, ref: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = sorted({r["model"] for r in points.values() if r["model"] != "guidance"}, key=lambda n: (n != "teacher", n))
    for name in names:
        pts = sorted((r["steps"], r["fd"], r["accuracy"]) for r in points.values() if r["model"] == name)
        steps, fd, acc = zip(*pts)
        style = dict(ls="--", color="gray") if name == "teacher" else {}
        axes[0].plot(steps, fd, marker="o", label=f"{name} (Euler)" if name == "teacher" else name, **style)
        axes[1].plot(steps, acc, marker="o", **style)
    lines = [("teacher, its default", ref, "k")] + [(f"guidance student, {r['nfe']:.0f} NFE", r, "tab:purple") for r in points.values() if r["model"] == "guidance"]
    for label, r, color in lines:
        axes[0].axhline(r["fd"], color=color, ls=":", lw=1, label=label)
        axes[1].axhline(r["accuracy"], color=color, ls=":", lw=1)
    axes[1].axhline(0.90, color="tab:red", lw=0.8, alpha=0.5)
    axes[1].axhline(0.85, color="tab:red", lw=0.8, alpha=0.3)
    for ax, label in zip(axes, ("FD-EffNet (lower is better)", "class accuracy")):
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
    p.add_argument("--steps", type=int, nargs="*", default=STEPS, help="Euler steps of the few-step points")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per point (FD-EffNet is full rank above 1280)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="docs/distill")
    args = p.parse_args()
    students = dict(s.split("=", 1) for s in args.student)
    if any(not k or not v for k, v in students.items()) or len(students) != len(args.student):
        p.error("--student takes NAME=PATH, one distinct name each.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "distill.json"
    points = json.loads(file.read_text())["points"] if file.exists() else {}
    tmp = Path("results") / "distill-samples.npz"
    tmp.parent.mkdir(exist_ok=True)
    common = dict(n=args.num_samples, seed=args.seed, batch=args.batch, tmp=tmp)

    def point(key: str, name: str, ckpt: str, sampler: str | None = None, steps: int | None = None) -> None:
        if key in points:
            return
        pipe = load_pipeline(SampleNpzConfig(ckpt=ckpt, device=args.device))
        s = pipe.sampling
        pipe.sampling = replace(s, sampler=sampler or s.sampler, steps=steps or s.steps)
        r = run_point(pipe, pipe.sampling.sampler, pipe.sampling.steps, pipe.sampling.cfg_interval, **common)
        points[key] = {"model": name, "ckpt": ckpt, "sampler": pipe.sampling.sampler, "steps": pipe.sampling.steps, "cfg_scale": s.cfg_scale, **r}
        file.write_text(json.dumps({"settings": vars(args), "points": points}, indent=2) + "\n")
        print(key, json.dumps(points[key]), flush=True)

    teacher = str(find_checkpoint(args.teacher))
    point("teacher|default", "teacher-default", teacher)
    for k in args.steps:
        point(f"teacher|{k}", "teacher", teacher, "euler", k)
    if args.guidance:
        point("guidance|default", "guidance", str(find_checkpoint(args.guidance)))
    for name, path in students.items():
        for k in args.steps:
            point(f"{name}|{k}", name, student_checkpoint(path, k), "euler", k)

    ref = points["teacher|default"]
    rows = ["| model | sampler | steps | cfg | NFE | forwards/sample | images/s | FD-EffNet | vs teacher | accuracy | goal met |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in points.values():
        name = "teacher" if r["model"] == "teacher-default" else r["model"]
        rows.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['cfg_scale']:g} | {r['nfe']:.0f} | {r['forwards']:.0f} | "
                    f"{args.num_samples / r['seconds']:.0f} | {r['fd']:.1f} | {r['fd'] / ref['fd']:.2f} | {r['accuracy']:.3f} | {goal(name, r, ref)} |")  # fmt: skip
    (out / "distill.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    plot({k: v for k, v in points.items() if v["model"] != "teacher-default"}, ref, out)


if __name__ == "__main__":
    main()
