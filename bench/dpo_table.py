"""Runs of `ditkit dpo` side by side: their settings, unguided class accuracy and FD-EffNet before
and after, the accuracy change measured sample by sample (before and after share labels and noise),
and per-class accuracy before and after for one run, as a table (OUT/dpo.md) and a plot (OUT/dpo.png).

    python bench/dpo_table.py --run margin-0.5=results/dpo-m05-512 --run no-margin=results/dpo-m0-512 \\
        --plot margin-0.5 --out docs/dpo

Each run folder is what `ditkit dpo --out RUN` wrote with --eval-samples above 1280: report.json,
before.npz, after.npz (its settings are in report.json).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditkit.data import FASHION_MNIST_CLASSES  # noqa: E402
from ditkit.dpo import paired_change  # noqa: E402
from ditkit.eval.classifier import classifier_predictions, load_classifier  # noqa: E402

SETTINGS = ("samples_per_class", "min_margin", "steps", "lr", "beta", "lora_rank")


def per_class(path: Path, model) -> np.ndarray:
    with np.load(path) as f:
        labels = f["labels"]
        ok = classifier_predictions(model, f["arr_0"]) == labels
    return np.array([ok[labels == c].mean() for c in range(len(FASHION_MNIST_CLASSES))])


def plot(name: str, before: np.ndarray, after: np.ndarray, runs: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(FASHION_MNIST_CLASSES))
    axes[0].bar(x - 0.2, before, 0.4, label="before", color="tab:gray")
    axes[0].bar(x + 0.2, after, 0.4, label=f"after ({name})", color="tab:blue")
    axes[0].set_xticks(x, FASHION_MNIST_CLASSES, rotation=30, fontsize=8)
    axes[0].set_ylim(min(before.min(), after.min()) - 0.1, 1.0)
    axes[0].set_ylabel("unguided class accuracy")
    axes[0].legend(fontsize=8)
    axes[0].grid(axis="y", alpha=0.3)
    for run, r in runs.items():
        change = r["paired"]["change"]
        fd = r["after"]["FD-EffNet"] / r["before"]["FD-EffNet"]
        axes[1].errorbar(fd, change, yerr=r["paired"]["paired_se"], marker="o", capsize=3, ls="none", label=run)
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xlabel("FD-EffNet after / before (1: as far from the real images as before)")
    axes[1].set_ylabel("accuracy change (paired, ± 1 s.e.)")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("ditkit dpo: Diffusion-DPO with a LoRA on the bundled model, judged by the shipped classifier", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "dpo.png", dpi=130)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=PATH", help="a ditkit dpo output folder and its name; repeat")
    p.add_argument("--plot", help="the run whose per-class accuracy is plotted (default: the first)")
    p.add_argument("--out", default="docs/dpo")
    args = p.parse_args()
    paths = dict(spec.partition("=")[::2] for spec in args.run)
    if any(not k or not v for k, v in paths.items()) or len(paths) != len(args.run):
        p.error("--run takes NAME=PATH, one distinct name each.")
    shown = args.plot or next(iter(paths))
    if shown not in paths:
        p.error(f"--plot {shown} names no run; pass one of: {', '.join(paths)}.")
    model = load_classifier()[0]
    runs, rows = {}, []
    for name, path in paths.items():
        path = Path(path)
        if not (path / "report.json").is_file():
            p.error(f"{path} holds no report.json; pass a folder that ditkit dpo --out wrote.")
        report = json.loads((path / "report.json").read_text())
        settings = report.get("settings")
        if settings is None or "after" not in report:
            p.error(f"{path}/report.json records no settings or no evaluation; run ditkit dpo with --eval-samples above 1280 again.")
        report["paired"] = report.get("paired") or paired_change(path / "before.npz", path / "after.npz")
        runs[name] = report
        b, a, pc = report["before"], report["after"], report["paired"]
        rows.append(f"| {name} | " + " | ".join(f"{settings[k]:g}" for k in SETTINGS) + f" | {report['pairs']} | "
                    f"{b['accuracy']:.3f} → {a['accuracy']:.3f} | {pc['change']:+.4f} ± {pc['paired_se']:.4f} | {pc['fixed']} / {pc['broken']} | "
                    f"{b['FD-EffNet']:.1f} → {a['FD-EffNet']:.1f} |")  # fmt: skip
    head = ["| run | samples/class | min margin | steps | lr | beta | LoRA rank | pairs | accuracy | change (paired) | fixed / broken | FD-EffNet |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    path = Path(paths[shown])
    before, after = per_class(path / "before.npz", model), per_class(path / "after.npz", model)
    classes = ["| class | " + " | ".join(FASHION_MNIST_CLASSES) + " |", "|---" * (len(FASHION_MNIST_CLASSES) + 1) + "|",
               "| before | " + " | ".join(f"{v:.3f}" for v in before) + " |", f"| after ({shown}) | " + " | ".join(f"{v:.3f}" for v in after) + " |"]  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/dpo_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = f"Made by `{command}`; each run by `ditkit dpo` with the settings shown (report.json in its folder).\n\n" + "\n".join(head + rows) + "\n\nPer-class accuracy, " + shown + ":\n\n" + "\n".join(classes) + "\n"
    (out / "dpo.md").write_text(text)
    plot(shown, before, after, runs, out)
    print(text)


if __name__ == "__main__":
    main()
