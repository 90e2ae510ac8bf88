"""Write a training checkpoint's EMA weights as the model bundled with ditkit.

    ditkit train --config fmnist-cpu --max-steps 1500
    ditkit train --config fmnist-cpu --resume latest --max-steps 6300 --precision bf16 --compile
    python scripts/bundle_model.py results/000-DiT-S-4/checkpoints/0006300.pt

The text-to-image model (`ditkit sample --prompt ...`) goes to its own folder:

    ditkit train --config fmnist-text-cpu
    python scripts/bundle_model.py results/001-MMDiT-S-4/checkpoints/0004000.pt --sampler heun2 --steps 10

The bundled config.json carries the sampling settings `ditkit sample` uses for it by default.
Given a model folder instead of a training checkpoint, it re-records only those settings (the
weights are copied unchanged, and the folder's recorded source and data are kept):

    python scripts/bundle_model.py ditkit/assets/fashion-mnist --sampler heun --steps 5 --cfg-scale 2.5 --cfg-interval 0.1 1

With --guide, guidance is autoguidance by that weaker model of the same data: its EMA weights go
to OUT/guide/ and the folder records it, so `ditkit sample` guides with it by default:

    python scripts/bundle_model.py RUN/model --guide GUIDE_RUN/checkpoints/0001000.pt --sampler heun --steps 3 --cfg-scale 2
"""

import json

import argparse
from pathlib import Path

from ditkit.checkpoints import read_checkpoint, save_pretrained
from ditkit.config import MMDiTConfig
from ditkit.distill import recorded_data
from ditkit.pipeline import BUNDLED, BUNDLED_TEXT
from ditkit.utils.runs import find_checkpoint

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a ditkit training checkpoint (its EMA weights are taken), or a model folder to re-record")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), help="guide only for t in [LO, HI] (t = 0 noise, 1 data)")
    p.add_argument("--guide", help="autoguidance: a weaker model of the same data (any --ckpt form), shipped in OUT/guide/ and recorded as the default guide")
    p.add_argument("--out", default=None, help=f"default: {BUNDLED}, or {BUNDLED_TEXT} for a text-to-image model")
    args = p.parse_args()
    ck = read_checkpoint(args.ckpt)
    sampling = {"sampler": args.sampler, "num_sampling_steps": args.steps, "cfg_scale": args.cfg_scale}
    if args.cfg_interval:
        sampling["cfg_interval"] = list(args.cfg_interval)
    folder_config = Path(args.ckpt) / "config.json"
    recorded = json.loads(folder_config.read_text()) if folder_config.is_file() else {}
    extra = {"source": recorded.get("source", Path(args.ckpt).as_posix()), "objective": ck.meta.get("objective", {"objective": "gaussian"}), "sampling": sampling}
    data = recorded.get("data") or recorded_data(Path(args.ckpt))
    if data:
        extra["data"] = data  # what ditkit distill and --init-from train on by default
    text = isinstance(ck.config, MMDiTConfig)
    if text:
        extra["text_encoder"] = ck.meta["text_encoder"]
    out = Path(args.out or (BUNDLED_TEXT if text else BUNDLED))
    if args.guide:
        guide = read_checkpoint(find_checkpoint(args.guide))
        guide_extra = {"source": Path(args.guide).as_posix(), "objective": guide.meta.get("objective", extra["objective"])}
        if text:
            guide_extra["text_encoder"] = guide.meta["text_encoder"]
        save_pretrained(guide.state, guide.config, out / "guide", extra=guide_extra)
        sampling["guide"] = "guide"  # relative to the model folder
        print(f"wrote {out / 'guide'} ({sum(v.numel() for v in guide.state.values()):,} parameters): the default guide")
    folder = save_pretrained(ck.state, ck.config, out, extra=extra)
    print(f"wrote {folder} ({sum(v.numel() for v in ck.state.values()):,} parameters)")
