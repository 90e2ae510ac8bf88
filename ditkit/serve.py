"""`ditkit serve`: a web page and a JSON API over one pipeline, with dynamic batching.

    POST /api/generate {"classes": [3], "num_samples": 4, "seed": 7, "sampler": "ddim",
                        "num_sampling_steps": 25, "cfg_scale": 4.0}
      -> {"images": ["data:image/png;base64,...", ...], "labels": [3, 3, 3, 3], ...}
    GET /api/info (model, samplers, defaults, limits), GET /api/status (queue, progress), GET / (the page)

Requests wait in one bounded queue. A worker takes the oldest request and every queued request
that shares its sampler, steps and guidance scale, up to --max-batch-size images, and samples them
as one model batch in a thread, so the event loop keeps answering. Each request draws its noise from
its own torch.Generator(seed), so its images do not depend on what it was batched with (up to the
float round-off of batched matmuls, ~1e-5, which can move a pixel by one level). Samplers that draw
per-step noise for the whole batch (ddpm, ddim with eta > 0, sde-euler, sde-heun) or pick their steps
from the whole batch's error (dopri5) run each request as its own batch, where the request's
generator also draws the per-step noise. A full queue answers 503 with Retry-After, and so does a
request whose deadline passes; a batch whose every request has gone is abandoned mid-sampling.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from .checkpoints import describe
from .cli import build_config
from .config import GenerateRequest, ServeConfig, samplers_for
from .objectives import objective_name
from .pipeline import Pipeline, load_pipeline, to_uint8
from .samplers import check_labels

PAGE = Path(__file__).parent / "serve_static" / "index.html"
# Samplers whose per-sample result does not depend on the rest of the batch (see the module docstring).
BATCH_INVARIANT = frozenset({"ddim", "dpm++2m", "unipc", "euler", "heun", "heun2"})


class Busy(Exception):
    """The server cannot take or finish a request now; `retry_after` seconds is its estimate."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Abandoned(Exception):
    """Every request of a batch has gone (deadline passed), or the server is closing: stop sampling it."""


@dataclass(eq=False)
class Job:
    """One request: its pipeline variant (sampler, steps, guidance), labels and seed; its handler
    cancels `future` when the deadline passes."""

    pipe: Pipeline
    labels: torch.Tensor  # (n,)
    seed: int
    future: asyncio.Future
    queued: float = field(default_factory=time.monotonic)

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys share a model batch; None: this job runs alone."""
        s = self.pipe.sampling
        if s.sampler not in BATCH_INVARIANT or (s.sampler == "ddim" and s.eta > 0):
            return None
        return s.sampler, s.steps, s.cfg_scale


def png_data_url(image) -> str:
    """(H, W, C) uint8 -> a data: URL of a PNG (grayscale for one channel)."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def api_message(error: Exception) -> str:
    """The config validator names flags (--num-sampling-steps); the API's fields are num_sampling_steps."""
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), str(error).strip().splitlines()[0])


def check_limits(pipe: Pipeline, cfg: ServeConfig) -> None:
    if pipe.sampling.steps > cfg.max_steps:
        raise ValueError(f"the model samples with {pipe.sampling.steps} steps by default, more than --max-steps {cfg.max_steps}; "
                         "pass --num-sampling-steps or raise --max-steps.")  # fmt: skip


class Batcher:
    """The bounded queue and the worker that samples its requests in batches."""

    def __init__(self, pipe: Pipeline, cfg: ServeConfig):
        check_limits(pipe, cfg)
        self.pipe, self.cfg = pipe, cfg
        self.queue: deque[Job] = deque()
        self.arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ditkit-sampler")
        self.running: dict | None = None  # {"images", "step", "steps"} of the batch being sampled
        self.seconds_per_image: float | None = None  # recent model cost, for Retry-After
        self.served = {"requests": 0, "images": 0, "batches": 0}
        self.closed = False

    # -- requests ---------------------------------------------------------------------------------
    def parse(self, body: bytes) -> tuple[Pipeline, torch.Tensor, int]:
        """The request's pipeline variant, labels (n,) and seed; ValueError with one sentence if bad."""
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ValueError(f'the request body is not valid JSON ({e}); send an object such as {{"classes": [3]}}.') from None
        if not isinstance(data, dict):
            raise ValueError('the request body must be a JSON object such as {"classes": [3]}.')
        req = build_config(GenerateRequest, data)
        c, base = self.pipe.config, self.pipe.sampling
        if not req.classes:
            raise ValueError(f"classes is required: a list of class ids from 0 to {c.num_classes - 1}.")
        check_labels(torch.tensor(req.classes), c.num_classes)
        if req.num_samples > self.cfg.max_samples:
            raise ValueError(f"num_samples must be at most {self.cfg.max_samples} on this server, got {req.num_samples}; ask for fewer images.")
        steps = req.num_sampling_steps or base.steps
        if steps > self.cfg.max_steps:
            raise ValueError(f"num_sampling_steps must be at most {self.cfg.max_steps} on this server, got {steps}.")
        sampling = replace(base, sampler=req.sampler or base.sampler, steps=steps,
                           cfg_scale=base.cfg_scale if req.cfg_scale is None else req.cfg_scale)  # fmt: skip
        pipe = replace(self.pipe, sampling=sampling)  # checks the sampler against the model's objective
        labels = torch.tensor([req.classes[i % len(req.classes)] for i in range(req.num_samples)])
        return pipe, labels, req.seed

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the recent cost per image."""
        images = sum(len(j.labels) for j in self.queue) + (self.running or {}).get("images", 0)
        return max(1, math.ceil(images * (self.seconds_per_image or 0.0)))

    def submit(self, job: Job) -> None:
        self.queue = deque(j for j in self.queue if not j.future.done())  # drop requests whose deadline passed
        if len(self.queue) >= self.cfg.queue_size:
            wait = self.retry_after()
            raise Busy(f"the server is busy: {len(self.queue)} requests are queued; retry in {wait} s.", wait)
        self.queue.append(job)
        self.arrived.set()

    # -- the worker -------------------------------------------------------------------------------
    def take_batch(self) -> list[Job]:
        """The oldest live job and every queued job that may share its batch, up to max_batch_size images."""
        live = deque(j for j in self.queue if not j.future.done())  # done: its deadline passed (cancelled)
        if not live:
            self.queue = live
            return []
        head = live.popleft()
        batch, images, rest = [head], len(head.labels), deque()
        for job in live:
            if head.batch_key is not None and job.batch_key == head.batch_key and images + len(job.labels) <= self.cfg.max_batch_size:
                batch.append(job)
                images += len(job.labels)
            else:
                rest.append(job)
        self.queue = rest
        return batch

    def sample(self, batch: list[Job]) -> list[list[str]]:
        """One model batch (in the sampler thread) -> each job's images as PNG data URLs."""
        pipe = batch[0].pipe
        generators = [torch.Generator(pipe.device).manual_seed(j.seed) for j in batch]
        noise = torch.cat([pipe.noise(len(j.labels), g) for j, g in zip(batch, generators)])  # (N, C, H, W)
        labels = torch.cat([j.labels for j in batch])
        steps = pipe.sampling.steps

        def callback(info: dict) -> None:
            self.running = {"images": len(labels), "step": steps - int(info["i"]), "steps": steps}
            if self.closed or all(j.future.done() for j in batch):
                raise Abandoned

        start = time.perf_counter()
        # A lone job's generator goes on to draw the per-step noise; batched samplers draw none that counts.
        images = to_uint8(pipe.images(labels, noise=noise, generator=generators[0], callback=callback))  # (N, H, W, C)
        cost = (time.perf_counter() - start) / len(labels)
        self.seconds_per_image = cost if self.seconds_per_image is None else 0.7 * self.seconds_per_image + 0.3 * cost
        urls, i = [], 0
        for job in batch:
            urls.append([png_data_url(img) for img in images[i : i + len(job.labels)]])
            i += len(job.labels)
        return urls

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            if self.queue:
                # Let a batch gather for batch_window after its first request, unless it is full already.
                wait = self.queue[0].queued + self.cfg.batch_window - time.monotonic()
                if wait > 0 and sum(len(j.labels) for j in self.queue) < self.cfg.max_batch_size:
                    await asyncio.sleep(wait)
            batch = self.take_batch()
            if not self.queue:
                self.arrived.clear()
            if not batch:
                continue
            self.running = {"images": sum(len(j.labels) for j in batch), "step": 0, "steps": batch[0].pipe.sampling.steps}
            try:
                results = await loop.run_in_executor(self.executor, self.sample, batch)
            except Abandoned:
                continue
            except Exception as e:  # e.g. NaN samples from an extreme guidance scale: those requests fail, the server goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                self.running = None
            n = sum(len(j.labels) for j in batch)
            self.served["batches"] += 1
            for job, urls in zip(batch, results):
                if not job.future.done():
                    job.future.set_result((urls, n))
                    self.served["requests"] += 1
                    self.served["images"] += len(urls)

    def close(self) -> None:
        self.closed = True  # the running batch stops at its next step, so shutting down does not wait for it
        for job in self.queue:
            if not job.future.done():
                job.future.set_exception(Busy("the server is shutting down; retry later.", 5))
        self.queue.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def info(self) -> dict:
        c, s = self.pipe.config, self.pipe.sampling
        kind = objective_name(self.pipe.objective)
        samplers = list(samplers_for(kind))
        return {
            "model": describe(c), "num_classes": c.num_classes, "objective": kind,
            "samplers": samplers, "batch_invariant": [name for name in samplers if name in BATCH_INVARIANT],
            "defaults": {"classes": [0], "num_samples": 4, "seed": 0, "sampler": s.sampler, "num_sampling_steps": s.steps, "cfg_scale": s.cfg_scale},
            "limits": {"max_samples": self.cfg.max_samples, "max_steps": self.cfg.max_steps, "max_batch_size": self.cfg.max_batch_size,
                       "queue_size": self.cfg.queue_size, "timeout": self.cfg.timeout},
        }  # fmt: skip


def make_app(pipe: Pipeline, cfg: ServeConfig):
    """The Starlette app: the page, /api/info, /api/status and POST /api/generate."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    state: dict = {}
    page = PAGE.read_text()

    def error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def generate(request):
        batcher: Batcher = state["batcher"]
        try:
            pipe, labels, seed = batcher.parse(await request.body())
        except ValueError as e:
            return error(400, api_message(e))
        start = time.monotonic()
        job = Job(pipe, labels, seed, asyncio.get_running_loop().create_future())
        try:
            batcher.submit(job)
            urls, batch_images = await asyncio.wait_for(job.future, timeout=cfg.timeout)
        except Busy as e:
            return error(503, str(e), e.retry_after)
        except asyncio.TimeoutError:  # wait_for cancelled the job's future: the worker drops it
            wait = batcher.retry_after()
            return error(503, f"the images were not ready within the server's {cfg.timeout:g} s deadline; retry in {wait} s.", wait)
        except ArithmeticError as e:  # sampling went to NaN: a setting of this request
            return error(422, api_message(e))
        except Exception as e:
            return error(500, f"sampling failed ({type(e).__name__}: {api_message(e)}); the server goes on serving.")
        s = pipe.sampling
        return JSONResponse({
            "images": urls, "labels": labels.tolist(), "seed": seed, "sampler": s.sampler, "num_sampling_steps": s.steps,
            "cfg_scale": s.cfg_scale, "seconds": round(time.monotonic() - start, 3), "batch_images": batch_images,
        })  # fmt: skip

    async def info(request):
        return JSONResponse(state["batcher"].info())

    async def status(request):
        b: Batcher = state["batcher"]
        queued = [j for j in b.queue if not j.future.done()]
        return JSONResponse({"queued_requests": len(queued), "queued_images": sum(len(j.labels) for j in queued),
                             "running": b.running, "served": b.served})  # fmt: skip

    async def index(request):
        return HTMLResponse(page)

    @asynccontextmanager
    async def lifespan(app):
        batcher = state["batcher"] = Batcher(pipe, cfg)
        worker = asyncio.create_task(batcher.work())
        try:
            yield
        finally:
            worker.cancel()
            batcher.close()

    routes = [Route("/", index), Route("/api/info", info), Route("/api/status", status), Route("/api/generate", generate, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)


def run_serve(cfg: ServeConfig) -> None:
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError("ditkit serve needs starlette and uvicorn; pip install 'ditkit[serve]'.") from None
    pipe = load_pipeline(cfg)
    check_limits(pipe, cfg)
    app = make_app(pipe, cfg)
    print(f"serving {describe(pipe.config)} ({pipe.sampling.describe()}) at http://{cfg.host}:{cfg.port}/ "
          f"(batches of up to {cfg.max_batch_size} images, queue {cfg.queue_size}, deadline {cfg.timeout:g} s)", flush=True)  # fmt: skip
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
