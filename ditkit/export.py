"""`ditkit export`: a checkpoint in another format: a diffusers DiTPipeline folder, or ditkit's own."""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoints import describe, load_model, read_any, save_pretrained
from .config import DIFFUSERS_SAMPLERS, ExportConfig
from .hub import diffusers_obstacle, export_diffusers, finish_folder, fresh_folder
from .lora import apply_adapter, read_adapter
from .utils.runs import BUNDLED, find_checkpoint


def run_export(cfg: ExportConfig) -> Path:
    adapter = read_adapter(cfg.lora) if cfg.lora else None
    ck = read_any(cfg.ckpt or (find_checkpoint(adapter.base) if adapter and adapter.base else BUNDLED))
    objective = ck.meta.get("objective", {}).get("objective", "gaussian")
    model = load_model(ck)
    if adapter is not None:
        model = apply_adapter(model, adapter)  # merged: a plain model of the base's layout
    out = Path(cfg.out)
    obstacle = diffusers_obstacle(model.config, objective)
    if cfg.format == "diffusers" and obstacle:
        raise ValueError(f"{obstacle}, so export it with --format ditkit.")
    if cfg.format == "ditkit" or obstacle:  # no --format: diffusers where the model can be a DiTPipeline
        tmp = fresh_folder(out)
        try:
            save_pretrained(model, model.config, tmp, extra=ck.meta)
            finish_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        why = f" ({obstacle}; --format diffusers takes the paper's diffusion DiTs)" if cfg.format is None else ""
        print(f"wrote {out}: {describe(model.config)} in ditkit's format (model.safetensors + config.json){why}")
        return out
    recorded = ck.meta.get("sampling", {})
    sampler = cfg.sampler or (recorded.get("sampler") if recorded.get("sampler") in DIFFUSERS_SAMPLERS else "ddim")
    record = {"objective": ck.meta.get("objective", {"objective": "gaussian"}), "sampling": {**recorded, "sampler": sampler}}
    export_diffusers(model, out, vae=cfg.vae, sampler=sampler, record=record)
    if model.config.in_channels in (1, 3):
        print(f"wrote {out}: {describe(model.config)} as transformer/ and scheduler/ ({sampler}); a pixel-space model has no VAE, "
              "so DiTPipeline cannot decode it: load DiTTransformer2DModel.from_pretrained(OUT, subfolder='transformer').")  # fmt: skip
    else:
        print(f"wrote {out}: {describe(model.config)} as a DiTPipeline ({sampler}); load it with diffusers.DiTPipeline.from_pretrained('{out}').")
    return out
