"""`ditkit serve`: a web page and a JSON API over one pipeline, with dynamic batching and fair turns.

    POST /api/generate {"classes": [3], "num_samples": 4, "seed": 7, "sampler": "ddim",
                        "num_sampling_steps": 25, "cfg_scale": 4.0}        (a class-conditional model)
    POST /api/generate {"prompts": ["a dark ankle boot"], "num_samples": 2}  (a text-to-image model)
      -> {"images": ["data:image/png;base64,...", ...], "labels": [3, 3, 3, 3] or "prompts": [...], ...}
    GET /api/info (model, samplers, defaults, limits), GET /api/status (queue, progress), GET / (the page)

Batching. Requests wait in one bounded queue. A worker takes the oldest request and every queued
request that shares its sampler, steps and guidance scale, up to --max-batch-size images, as one
model batch. Each request draws its noise from its own torch.Generator(seed), so its images do not
depend on what it was batched with (up to the float round-off of batched matmuls, ~1e-5, which can
move a pixel by one level). Samplers that draw per-step noise for the whole batch (ddpm, ddim with
eta > 0, sde-euler, sde-heun) or pick their steps from the whole batch's error (dopri5) run each
request as its own batch, where the request's generator also draws the per-step noise.

Turns. Up to --active-batches batches are under way at once, each in its own thread, but one
computes at a time: after every step the model goes to the batch that has had the least model
time per request (a batch that starts begins level with the least served). A 1-image request
behind a 16-image one so finishes in about twice its own time instead of waiting for the other,
and every batch's images are still exactly what it would get alone, whatever its sampler. A full
queue and a missed deadline answer 503 with Retry-After: the unfinished work (images x steps)
times the measured seconds per image-step.

Refusals, before any sampling (README, "Serve"): a Host header that is not a name of this server
(DNS rebinding: another site's name made to point here) answers 400; an Origin of another site's
page, unless --allow-origin names it, 403; a body that is not application/json (what any page may
send without a CORS preflight) 415; a body over --max-body bytes 413, read in chunks and given up
early; bad values, nesting included, 400 in one sentence that quotes a few dozen characters of
them at most. A request whose client has gone is cancelled, and dopri5 may try --max-steps steps.
"""

from .app import make_app, run_serve
from .guard import Hosts

__all__ = ["make_app", "run_serve", "Hosts"]
