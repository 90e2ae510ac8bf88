"""`ditkit export`: a checkpoint in another format: a diffusers DiTPipeline folder, or ditkit's own."""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoints import describe, family, load_model, read_any, save_pretrained
from .config import DIFFUSERS_SAMPLERS, ExportConfig
from .hub import export_diffusers, finish_folder, fresh_folder
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
    if cfg.format == "ditkit":
        tmp = fresh_folder(out)
        try:
            save_pretrained(model, model.config, tmp, extra=ck.meta)
            finish_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"wrote {out}: {describe(model.config)} (ditkit format: model.safetensors + config.json)")
        return out
    if family(model.config) != "DiT":
        raise ValueError(f"DiTPipeline runs DiTs; this is {describe(model.config)}, so export it with --format ditkit.")
    if objective != "gaussian":
        raise ValueError(f"DiTPipeline samples diffusion models; this is a {objective} model, so export it with --format ditkit.")
    recorded = ck.meta.get("sampling", {}).get("sampler")
    sampler = cfg.sampler or (recorded if recorded in DIFFUSERS_SAMPLERS else "ddim")
    export_diffusers(model, out, vae=cfg.vae, sampler=sampler)
    if model.config.in_channels in (1, 3):
        print(f"wrote {out}: {describe(model.config)} as transformer/ and scheduler/ ({sampler}); a pixel-space model has no VAE, "
              "so DiTPipeline cannot decode it: load DiTTransformer2DModel.from_pretrained(OUT, subfolder='transformer').")  # fmt: skip
    else:
        print(f"wrote {out}: {describe(model.config)} as a DiTPipeline ({sampler}); load it with diffusers.DiTPipeline.from_pretrained('{out}').")
    return out
