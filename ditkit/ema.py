"""`ditkit ema`: post-hoc EMA (EDM2). A run trained with --ema-profiles keeps snapshots of a few
power EMAs; this writes the EMA of any length (and at any earlier step) as a model folder that
records the run's objective and sampling, so that the length can be chosen by measuring samples."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import read_checkpoint, save_pretrained
from .config import EMAConfig
from .train.posthoc import SNAPSHOTS, list_snapshots, reconstruct
from .utils.runs import find_checkpoint


def run_ema(cfg: EMAConfig) -> list[Path]:
    run = Path(cfg.run)
    if not run.is_dir():
        raise FileNotFoundError(f"--run {run} is not a folder; pass the run folder (RESULTS/NNN-MODEL) of a ditkit train --ema-profiles run.")
    if not list_snapshots(run):
        raise FileNotFoundError(f"{run} holds no EMA snapshots ({SNAPSHOTS}/sigma-*/NNNNNNN.safetensors); train it with --ema-profiles 0.05 0.10.")
    source = find_checkpoint(str(run))
    recorded = read_checkpoint(source)  # the run's model config, objective and sampling
    config_file = source / "config.json"
    data = json.loads(config_file.read_text()).get("data") if config_file.is_file() else None
    written = []
    for length in cfg.length:
        state, info = reconstruct(run, length, cfg.step)
        out = Path(cfg.out) if cfg.out else run / (f"ema-{length:.3f}" + (f"-s{cfg.step}" if cfg.step else ""))
        extra = {**recorded.meta, "source": run.as_posix(), "step": info["step"], "ema": info, **({"data": data} if data else {})}
        save_pretrained(state, recorded.config, out, extra=extra)
        print(f"wrote {out}: the EMA of length {length:g} at step {info['step']} from {info['snapshots']} snapshots "
              f"(the fit's relative error {info['fit_error']:.3f})", flush=True)  # fmt: skip
        written.append(out)
    return written
