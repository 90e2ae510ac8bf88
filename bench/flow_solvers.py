"""Flow ODE solvers on one trained model at one guidance setting: FD-EffNet and class accuracy
against network evaluations, with the time grid's shift as a further choice; a table.

    python bench/flow_solvers.py --ckpt fashion-mnist-v2 --cfg-scale 1.75 --interval 0.1 1 \\
        --points heun:5 heun:5:0.5 dpm++2m-flow:10 heun:16 --compile --out docs/samplers/bundled

A point is SAMPLER:STEPS[:SHIFT] (SHIFT: the SD3 shift of the time grid; below 1 puts more steps
near the data). Every point draws the same labels and noise (as bench/guidance_sweep.py, whose
points at the same settings it reproduces) and is scored against the Fashion-MNIST test set.
Resumable: finished points are kept in OUT/solvers.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.nfe_study import run_point  # noqa: E402
from ditkit.config import SampleNpzConfig  # noqa: E402
from ditkit.pipeline import load_pipeline  # noqa: E402


def parse_point(text: str) -> tuple[str, int, float | None]:
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        steps, shift = int(parts[1]), float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise SystemExit(f"--points takes SAMPLER:STEPS[:SHIFT], e.g. heun:5 or heun:5:0.5, got {text!r}.") from None
    return parts[0], steps, shift


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--points", nargs="+", required=True, metavar="SAMPLER:STEPS[:SHIFT]")
    p.add_argument("--cfg-scale", type=float, required=True)
    p.add_argument("--interval", type=float, nargs=2, help="guide only for t in [LO, HI] (t = 0 noise, 1 data); default: all steps")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--out", default="docs/samplers/solvers")
    args = p.parse_args()
    points = [parse_point(t) for t in args.points]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "solvers.json"
    saved = json.loads(file.read_text()) if file.exists() else {}
    results = saved.get("points", {})
    interval = tuple(args.interval) if args.interval else None
    pipe = load_pipeline(SampleNpzConfig(ckpt=args.ckpt, device="cpu", cfg_scale=args.cfg_scale, compile=args.compile))
    for sampler, steps, shift in points:
        key = f"{sampler}|{steps}" + ("" if shift is None else f"|shift{shift:g}")
        if key in results:
            continue
        pipe.sampling = replace(pipe.sampling, time_shift=shift)
        r = run_point(pipe, sampler, steps, interval, args.num_samples, args.seed, args.batch, out / "tmp.npz")
        results[key] = {"sampler": sampler, "steps": steps, "time_shift": shift, **r}
        file.write_text(json.dumps({"ckpt": args.ckpt, "cfg_scale": args.cfg_scale, "interval": interval, "num_samples": args.num_samples,
                                    "points": results}, indent=2))  # fmt: skip
        print(key, json.dumps(results[key]), flush=True)
    (out / "tmp.npz").unlink(missing_ok=True)
    lines = ["| sampler | steps | time shift | evals/sample | rows/sample | FD-EffNet | accuracy |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results.values(), key=lambda r: (r["nfe"], r["fd"])):
        shift = "-" if r["time_shift"] is None else f"{r['time_shift']:g}"
        lines.append(f"| {r['sampler']} | {r['steps']} | {shift} | {r['nfe']:.0f} | {r['forwards']:.0f} | {r['fd']:.1f} | {r['accuracy']:.3f} |")
    (out / "solvers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
