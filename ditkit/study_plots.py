"""The table and plots of `ditkit study`, from its result rows (one per trained run): quality against
Gflops per family (the paper's Figures 2 and 8, U-ViT's and the U-Net's beside DiT's), against the
wall-clock of training on this machine, and per conditioning block (Figure 5); every point is the
mean over seeds with a bar from the lowest to the highest seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import STUDY_SIZES, StudyConfig

METRICS = {"fd_effnet": "FD-EffNet (lower is better)", "accuracy": "class accuracy (higher is better)"}
SIZE_COLORS = dict(zip(STUDY_SIZES, ("tab:blue", "tab:orange", "tab:red", "tab:purple")))
PATCH_MARKERS = {1: "*", 2: "o", 4: "s", 8: "^"}
FAMILY_STYLES = {"U-ViT": dict(color="tab:green", marker="P"), "U-Net": dict(color="black", marker="D")}
KEY = ("family", "label", "model", "block", "patch", "level")


def group(rows: list[dict]) -> list[dict]:
    """One entry per network, over its seeds: the key fields, params, Gflops, and each metric's values."""
    out: dict[tuple, dict] = {}
    for r in rows:
        g = out.setdefault(tuple(r[k] for k in KEY), {**{k: r[k] for k in KEY}, "grids": set(), "params": r["params"], "gflops": r["gflops"],
                                                          "seeds": [], "fd_effnet": [], "accuracy": [], "train_s": [], "images_per_s": r["images_per_s"]})  # fmt: skip
        g["grids"] |= set(r["grids"])
        g["seeds"].append(r["seed"])
        g["images_per_s"] = g["images_per_s"] or r["images_per_s"]  # one seed's timing serves the network
        for k in ("fd_effnet", "accuracy", "train_s"):
            if r[k] is not None:
                g[k].append(r[k])
    return list(out.values())


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    each = " / ".join(format(v, fmt) for v in values)
    return f"**{format(np.mean(values), fmt)}** ({each})" if len(values) > 1 else each


def summary_table(rows: list[dict]) -> str:
    """Markdown: one table per comparison, each network's metrics as the mean (and each seed's)."""
    groups = group(rows)
    sections = [("sizes", "DiT model size x patch size (adaLN-Zero)", lambda g: (g["model"].split("/")[0], -g["patch"])),
                ("blocks", "The four conditioning blocks", lambda g: g["block"]),
                ("backbones", "Backbones at matched Gflops", lambda g: (g["level"], g["family"]))]  # fmt: skip
    lines = []
    for grid, title, order in sections:
        members = sorted((g for g in groups if grid in g["grids"]), key=order)
        if not members:
            continue
        lines += [f"### {title}", "", "| network | block | level | params | Gflops | FD-EffNet | accuracy | train img/s alone |", "|---|---|---|---|---|---|---|---|"]
        for g in members:
            speed = f"{g['images_per_s']:.0f}" if g["images_per_s"] else "-"
            lines.append(f"| {g['label']} | {g['block'] or '-'} | {g['level'] or '-'} | {g['params'] / 1e6:.3f}M | {g['gflops']:.4f} | "
                         f"{_cell(g['fd_effnet'], '.1f')} | {_cell(g['accuracy'], '.3f')} | {speed} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def _style(g: dict) -> dict:
    if g["family"] == "DiT":
        return dict(color=SIZE_COLORS.get(g["model"].split("/")[0], "tab:gray"), marker=PATCH_MARKERS.get(g["patch"], "o"))
    return FAMILY_STYLES[g["family"]]


DIT_LEVELS = "DiT at the levels"  # the DiTs of the backbones grid, one line as U-ViT's and the U-Net's


def _series(groups: list[dict]) -> dict[str, list[dict]]:
    """The lines of a quality plot: each DiT size across its patches (the sizes grid), the DiTs of the
    backbones grid across its levels, each other family across its levels."""
    lines: dict[str, list[dict]] = {}
    for g in groups:
        if g["family"] != "DiT":
            lines.setdefault(g["family"], []).append(g)
        elif g["block"] == "adaln_zero":
            if "sizes" in g["grids"]:
                lines.setdefault(f"DiT-{g['model'].split('/')[0]}", []).append(g)
            if "backbones" in g["grids"]:
                lines.setdefault(DIT_LEVELS, []).append(g)
    return lines


def _quality_plot(plt, groups: list[dict], x, xlabel: str, title: str, path: Path) -> Path:
    metrics = [m for m in METRICS if any(g[m] for g in groups)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    fig.suptitle(title)
    for metric, ax in zip(metrics, axes[0]):
        lines = _series(groups)
        for name, members in lines.items():
            members = sorted((g for g in members if g[metric] and x(g) is not None), key=x)
            if not members:
                continue
            color = "tab:red" if name == DIT_LEVELS else _style(members[0])["color"]
            dashes = (4, 2) if name == DIT_LEVELS and len(lines) > 3 else ()  # beside the size lines, told apart
            ax.plot([x(g) for g in members], [_mean(g[metric]) for g in members], color=color, alpha=0.6, label=name, dashes=dashes)
            for g in members:
                vals = g[metric]
                ax.errorbar(x(g), _mean(vals), yerr=[[_mean(vals) - min(vals)], [max(vals) - _mean(vals)]], color=color,
                            marker=_style(g)["marker"], markersize=7, capsize=3, linestyle="none")  # fmt: skip
                if g["family"] == "DiT":
                    ax.annotate(f"/{g['patch']}", (x(g), _mean(vals)), textcoords="offset points", xytext=(5, 3), fontsize="x-small")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(METRICS[metric])
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_results(rows: list[dict], cfg: StudyConfig, out: Path) -> list[Path]:
    """fd_vs_gflops.png, fd_vs_wallclock.png (with --time-runs' measurements) and blocks.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    where = f"{cfg.images:,} training images per run, recipe {cfg.recipe}" + (f" (lr {', '.join(cfg.family_lr)})" if cfg.family_lr else "")
    written = [_quality_plot(plt, groups, lambda g: g["gflops"], "Gflops (G multiply-adds per image)", f"Quality against Gflops ({where})",
                             out / "fd_vs_gflops.png")]  # fmt: skip
    if any(g["images_per_s"] for g in groups):
        seconds = lambda g: cfg.images / g["images_per_s"] if g["images_per_s"] else None  # noqa: E731
        written.append(_quality_plot(plt, groups, seconds, "training time alone on one core of this CPU (s)",
                                     f"Quality against training time ({where})", out / "fd_vs_wallclock.png"))  # fmt: skip
    blocks = [g for g in groups if "blocks" in g["grids"]]
    if blocks:
        metrics = [m for m in METRICS if any(g[m] for g in blocks)]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
        fig.suptitle(f"Conditioning blocks at DiT-{cfg.block_model} ({where})")
        for metric, ax in zip(metrics, axes[0]):
            for i, g in enumerate(blocks):
                ax.bar(i, _mean(g[metric]), color="tab:gray", alpha=0.5)
                ax.scatter([i] * len(g[metric]), g[metric], color="black", zorder=3, s=15)
            ax.set_xticks(range(len(blocks)), [f"{g['block']}\n{g['gflops']:.3g} Gflops" for g in blocks], fontsize="small")
            ax.set_ylabel(METRICS[metric])
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "blocks.png", dpi=120)
        plt.close(fig)
        written.append(out / "blocks.png")
    return written
