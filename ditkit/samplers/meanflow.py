"""The MeanFlow sampler: each step jumps with the network's average velocity over the whole step,
x_r = x_t + (r - t) u(x_t, t, r), from t = 0 (noise) to t = 1 (data); one step is one network
evaluation per sample. Guidance is already in the network (trained in), so it samples at cfg 1.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ..objectives.meanflow import MeanFlow


def meanflow(model_fn, flow: MeanFlow, x, steps, extra_args=None, callback=None, generator=None, progress=False, time_shift=None):
    """`steps` jumps on the time grid (uniform, or SD3-shifted by `time_shift`): one model call each."""
    extra_args = extra_args or {}
    ts = flow.time_grid(steps, shift=1.0 if time_shift is None else time_shift, device=x.device)
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        t, r = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        x = x + (ts[i + 1] - ts[i]) * flow.average_velocity(model_fn, x, t, r, **extra_args)
        if callback is not None:
            callback({"i": steps - 1 - i, "t": ts[i + 1], "x": x})
    return x
