"""The plots of `ditkit study`: quality over training steps per config, final quality against Gflops
(the paper's Figures 2, 5, 6 and 8), drawn from the study's result rows with matplotlib."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import StudyConfig

UNET = "U-Net"


SIZE_COLORS = {"S": "tab:blue", "B": "tab:orange", "L": "tab:green", "XL": "tab:red"}
PATCH_STYLES = {2: ("-", "o"), 4: ("--", "s"), 8: (":", "^")}
BLOCK_COLORS = {"adaln_zero": "tab:red", "adaln": "tab:blue", "cross_attn": "tab:green", "in_context": "tab:purple"}
UNET_STYLE = dict(color="black", linestyle="-.", marker="D")


def _style(row: dict) -> dict:
    if row["model"] == UNET:
        return UNET_STYLE
    size = row["model"].removeprefix("DiT-").partition("/")[0]
    line, marker = PATCH_STYLES[row["patch"]]
    return dict(color=SIZE_COLORS[size], linestyle=line, marker=marker)


def _label(row: dict) -> str:
    return f"U-Net ({row['gflops']:.3g} Gflops)" if row["model"] == UNET else row["model"]


def _by_run(rows: list[dict]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    return runs


def _metric_axes(plt, rows: list[dict], title: str):
    """One panel for FD-EffNet, and one for accuracy when the data has it."""
    metrics = ["fd_effnet"] + (["accuracy"] if any(r["accuracy"] is not None for r in rows) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    fig.suptitle(title)
    return fig, list(zip(metrics, axes[0]))


METRIC_LABELS = {"fd_effnet": "FD-EffNet (lower is better)", "accuracy": "class accuracy (higher is better)"}


def _plot_over_steps(plt, runs: dict[str, list[dict]], title: str, style, path: Path) -> None:
    rows = [r for rs in runs.values() for r in rs]
    fig, panels = _metric_axes(plt, rows, title)
    for metric, ax in panels:
        for name, rs in runs.items():
            ax.plot([r["step"] for r in rs], [np.nan if r[metric] is None else r[metric] for r in rs], label=style(rs[0])[1], **style(rs[0])[0])
        ax.set_xlabel("training steps")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
    panels[0][1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_results(rows: list[dict], cfg: StudyConfig, out: Path) -> list[Path]:
    """fd_vs_steps.png (Figures 2 and 6), fd_vs_gflops.png (Figure 8), blocks.png (Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _by_run(rows)
    written = []
    grid = {n: rs for n, rs in runs.items() if rs[0]["model"] == UNET or (rs[0]["block"] == "adaln_zero" and rs[0]["model"] in cfg.models)}
    if grid:
        path = out / "fd_vs_steps.png"
        _plot_over_steps(plt, grid, f"Model size and patch size, {cfg.data_path}", lambda r: (_style(r), _label(r)), path)
        written.append(path)
        finals = [rs[-1] for rs in grid.values()]
        fig, panels = _metric_axes(plt, finals, f"Quality against forward Gflops at the last evaluated step, {cfg.data_path}")
        for metric, ax in panels:
            for r in finals:
                if r[metric] is None:
                    continue
                s = _style(r)
                ax.scatter(r["gflops"], r[metric], color=s["color"], marker=s["marker"], s=50, zorder=3)
                ax.annotate(f"{_label(r).split(' (')[0]} @{r['step']}", (r["gflops"], r[metric]), textcoords="offset points", xytext=(5, 4), fontsize="small")
            ax.set_xscale("log")
            ax.set_xlabel("Gflops (G multiply-adds per image)")
            ax.set_ylabel(METRIC_LABELS[metric])
            ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        path = out / "fd_vs_gflops.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    blocks = {n: rs for n, rs in runs.items() if rs[0]["model"] == cfg.block_model}  # adaLN-Zero too, when it came from the grid
    if cfg.blocks and blocks:
        path = out / "blocks.png"
        style = lambda r: (dict(color=BLOCK_COLORS[r["block"]], marker="o"), f"{r['block']} ({r['gflops']:.3g} Gflops)")  # noqa: E731
        _plot_over_steps(plt, blocks, f"Conditioning blocks at {cfg.block_model}, {cfg.data_path}", style, path)
        written.append(path)
    return written
