"""Do prompts control the motion of a text-to-video model? Samples clips from prompts naming each of
the four diagonal directions and every Fashion-MNIST item (training phrasings, "seen", and phrasings
never trained on, "unseen"), then `ditkit eval`'s prompt following on them: the share of clips whose
centroid moves in the named direction (over the first step, the first 4 frames and the whole clip),
and the share whose majority class under the shipped classifier of moving items is the named item,
each beside the same figures of as many real moving-fashion-mnist clips with their own captions'
directions (see ditkit.video.captions).

    python bench/text_video_prompts.py --ckpt results/000-MMDiT-S-4x4 --num-samples 400 --out t2v
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ditkit.cli import main
from ditkit.video.captions import GROUPS, motion_prompts


def run(ckpt: str, n: int, out: Path, extra: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.txt"
    per_group = n // len(GROUPS)
    prompts.write_text("".join(f"{p}\n" for g in GROUPS for p in motion_prompts(per_group, g)))
    samples = out / "samples.npz"
    code = main(["sample-npz", "--ckpt", ckpt, "--prompts", str(prompts), "--num-samples", str(per_group * len(GROUPS)), "--out", str(samples), *extra])
    return code or main(["eval", "--samples", str(samples), "--metrics", "accuracy", "consistency"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a text-to-video model: run folder, model folder or checkpoint")
    parser.add_argument("--num-samples", type=int, default=400, help="clips in all, half per group")
    parser.add_argument("--out", type=Path, default=Path("t2v-prompts"), help="folder for prompts.txt and samples.npz")
    args, extra = parser.parse_known_args()  # the rest goes to sample-npz (--seed, --cfg-scale, --num-sampling-steps, --device ...)
    raise SystemExit(run(args.ckpt, args.num_samples, args.out, extra))
