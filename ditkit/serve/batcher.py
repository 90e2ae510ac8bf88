"""The server's queue and its worker: requests become jobs, jobs that share a model batch are
sampled together, and batches take turns step by step, so a small request need not wait for a large
one (see ditkit.serve's docstring)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace

import torch
from PIL import Image

from ..checkpoints import describe
from ..config import GenerateRequest, ServeConfig, samplers_for
from ..objectives import objective_name
from ..pipeline import Pipeline
from ..utils.images import to_uint8
from ..video.io import gif_bytes
from .guard import clip

# Samplers whose per-sample result does not depend on the rest of the batch (see the module docstring).
BATCH_INVARIANT = frozenset({"ddim", "dpm++2m", "unipc", "euler", "heun", "heun2", "dpm++2m-flow"})
log = logging.getLogger("uvicorn.error")  # the server's log, which uvicorn prints


class Busy(Exception):
    """The server cannot take or finish a request now; `retry_after` seconds is its estimate."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Abandoned(Exception):
    """Every request of a batch has gone (deadline passed, client left), or the server is closing: stop sampling it."""


def check_limits(pipe: Pipeline, cfg: ServeConfig) -> None:
    if pipe.sampling.steps > cfg.max_steps:
        raise ValueError(f"the model samples with {pipe.sampling.steps} steps by default, more than --max-steps {cfg.max_steps}; "
                         "pass --num-sampling-steps or raise --max-steps.")  # fmt: skip


# -- requests and batches ----------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One request: its pipeline variant (sampler, steps, guidance), what conditions each image (class
    ids or prompts) and seed; its handler cancels `future` when the deadline passes or the client goes."""

    pipe: Pipeline
    items: list  # (n,) class ids or prompts
    seed: int
    steps: int  # the sampler's steps; dopri5's: the most it may try
    future: asyncio.Future = None  # type: ignore[assignment]  # set when it is submitted
    queued: float = field(default_factory=time.monotonic)

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys share a model batch; None: this job runs alone."""
        s = self.pipe.sampling
        if s.sampler not in BATCH_INVARIANT or (s.sampler == "ddim" and s.eta > 0):
            return None
        return s.sampler, s.steps, s.cfg_scale


@dataclass(eq=False)
class Batch:
    """Jobs sampled as one model batch, with its progress and its share of the model so far."""

    jobs: list[Job]
    step: int = 0  # steps done (dopri5: tried)
    vtime: float = 0.0  # seconds of model time per request so far: the batch with the least computes next
    since: float = 0.0  # when it last took the model

    @property
    def images(self) -> int:
        return sum(len(j.items) for j in self.jobs)

    @property
    def steps(self) -> int:
        return self.jobs[0].steps

    @property
    def gone(self) -> bool:
        return all(j.future.done() for j in self.jobs)

    def progress(self) -> dict:
        return {"images": self.images, "requests": len(self.jobs), "step": min(self.step, self.steps), "steps": self.steps}


class Turns:
    """Lends the model to one batch at a time: after each step, to the waiting batch that has had the
    least model time per request if that is less than the current one's (fair sharing by requests)."""

    def __init__(self, closed):
        self.cond = threading.Condition()
        self.holder: Batch | None = None
        self.waiting: list[Batch] = []
        self.closed = closed  # () -> bool: the server is shutting down

    def enter(self, batch: Batch) -> None:
        """Wait for the model; a newcomer starts level with the least served, so it neither jumps
        ahead for long nor waits behind everyone."""
        with self.cond:
            others = self.waiting + ([self.holder] if self.holder else [])
            batch.vtime = min((b.vtime for b in others), default=0.0)
            self._wait(batch)

    def step(self, batch: Batch) -> float:
        """After a step: its model seconds (returned), and the model handed on if another batch has had less."""
        with self.cond:
            now = time.perf_counter()
            seconds = now - batch.since
            batch.vtime += seconds / len(batch.jobs)
            if self.waiting and min(b.vtime for b in self.waiting) < batch.vtime:
                self.holder = None
                self._wait(batch)
            else:
                batch.since = now
            return seconds

    def leave(self, batch: Batch) -> None:
        with self.cond:
            if self.holder is batch:
                self.holder = None
                self._hand_on()
            elif batch in self.waiting:
                self.waiting.remove(batch)

    def _hand_on(self) -> None:
        if self.holder is None and self.waiting:
            self.holder = min(self.waiting, key=lambda b: b.vtime)
            self.waiting.remove(self.holder)
            self.cond.notify_all()

    def _wait(self, batch: Batch) -> None:  # with self.cond held
        self.waiting.append(batch)
        while True:
            self._hand_on()
            if batch.gone or self.closed():
                if self.holder is batch:
                    self.holder = None
                    self._hand_on()
                else:
                    self.waiting.remove(batch)
                raise Abandoned
            if self.holder is batch:
                break
            self.cond.wait(0.1)  # woken by a hand-on; the timeout notices a deadline passed or a client gone
        batch.since = time.perf_counter()


def png_data_url(image) -> str:
    """(H, W, C) uint8 -> a data: URL of a PNG (grayscale for one channel); a clip (T, H, W, C) -> an
    animated GIF's."""
    if image.ndim == 4:
        return "data:image/gif;base64," + base64.b64encode(gif_bytes(image)).decode("ascii")
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Batcher:
    """The bounded queue, and the worker that samples its requests in batches that take turns."""

    def __init__(self, pipe: Pipeline, cfg: ServeConfig):
        check_limits(pipe, cfg)
        self.pipe, self.cfg = pipe, cfg
        self.text = pipe.text_encoder is not None
        self.queue: deque[Job] = deque()
        self.arrived = asyncio.Event()
        self.slots = asyncio.Semaphore(cfg.active_batches)
        self.executor = ThreadPoolExecutor(max_workers=cfg.active_batches, thread_name_prefix="ditkit-sampler")
        self.turns = Turns(lambda: self.closed)
        self.active: list[Batch] = []
        self.tasks: set[asyncio.Task] = set()
        self.seconds_per_image_step: float | None = None  # measured at every step, for Retry-After
        self.served = {"requests": 0, "images": 0, "batches": 0}
        self.closed = False

    # -- requests ---------------------------------------------------------------------------------
    def parse(self, body: bytes) -> Job:
        """The request as a Job (its future not yet set); ValueError with one sentence if bad."""
        try:
            data = json.loads(body)
        except RecursionError:
            raise ValueError('the request body nests too deeply; send a flat JSON object such as {"classes": [3]}.') from None
        except ValueError as e:
            raise ValueError(f'the request body is not valid JSON ({clip(e, 80)}); send an object such as {{"classes": [3]}}.') from None
        if not isinstance(data, dict):
            raise ValueError('the request body must be a JSON object such as {"classes": [3]}.')
        names = [f.name for f in fields(GenerateRequest)]
        unknown = [name for name in data if name not in names]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise ValueError(f"unknown setting(s) {', '.join(map(clip, unknown[:3]))}{more}; known settings: {', '.join(sorted(names))}.")
        for name, value in data.items():
            if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value)):
                raise ValueError(f"{name} must be a value or a flat list of values, not a nested list or an object.")
            if isinstance(value, list) and len(value) > self.cfg.max_samples:
                raise ValueError(f"{name} has {len(value)} entries, more than the {self.cfg.max_samples} images a request may ask for "
                                 f"on this server; send at most {self.cfg.max_samples}.")  # fmt: skip
        req = GenerateRequest(**data)  # validated (types, ranges) by the config itself
        items = self.conditions(req)
        n = req.num_samples or len(items)
        if n > self.cfg.max_samples:
            raise ValueError(f"num_samples must be at most {self.cfg.max_samples} on this server, got {n}; ask for fewer images.")
        base = self.pipe.sampling
        steps = req.num_sampling_steps or base.steps
        if steps > self.cfg.max_steps:
            raise ValueError(f"num_sampling_steps must be at most {self.cfg.max_steps} on this server, got {steps}.")
        sampling = replace(base, sampler=req.sampler or base.sampler, steps=steps,
                           cfg_scale=base.cfg_scale if req.cfg_scale is None else req.cfg_scale)  # fmt: skip
        pipe = replace(self.pipe, sampling=sampling)  # checks the sampler against the model's objective
        return Job(pipe, [items[i % len(items)] for i in range(n)], req.seed, self.cfg.max_steps if sampling.sampler == "dopri5" else steps)

    def conditions(self, req: GenerateRequest) -> list:
        """The request's class ids or prompts, checked against the model."""
        if self.text:
            if req.classes:
                raise ValueError(f'this is a {self.pipe.config.kind} model: it takes prompts, not class ids; send {{"prompts": ["a dark ankle boot"]}}.')
            if not req.prompts:
                raise ValueError('prompts is required: a list of texts such as {"prompts": ["a dark ankle boot"]}.')
            return list(req.prompts)
        if req.prompts:
            raise ValueError('this is a class-conditional model: it takes class ids, not prompts; send {"classes": [3]}.')
        n = self.pipe.config.num_real_classes
        if not req.classes:
            raise ValueError(f"classes is required: a list of class ids from 0 to {n - 1}.")
        for c in req.classes:
            if c >= n:
                raise ValueError(f"class id {clip(c)} is outside [0, {n}); pass class ids from 0 to {n - 1}.")
        return list(req.classes)

    def retry_after(self) -> int:
        """Seconds until the work under way and queued is likely done: images x steps x measured cost."""
        work = sum(b.images * max(b.steps - b.step, 0) for b in self.active)
        work += sum(len(j.items) * j.steps for j in self.queue if not j.future.done())
        return max(1, math.ceil(work * (self.seconds_per_image_step or 0.0)))

    def submit(self, job: Job) -> None:
        self.queue = deque(j for j in self.queue if not j.future.done())  # drop requests that have gone
        if len(self.queue) >= self.cfg.queue_size:
            wait = self.retry_after()
            raise Busy(f"the server is busy: {len(self.queue)} requests are queued; retry in {wait} s.", wait)
        self.queue.append(job)
        self.arrived.set()

    # -- the worker -------------------------------------------------------------------------------
    def take_batch(self) -> Batch | None:
        """The oldest live job and every queued job that may share its batch, up to max_batch_size images."""
        live = deque(j for j in self.queue if not j.future.done())  # done: its deadline passed or its client left
        if not live:
            self.queue = live
            return None
        head = live.popleft()
        jobs, images, rest = [head], len(head.items), deque()
        for job in live:
            if head.batch_key is not None and job.batch_key == head.batch_key and images + len(job.items) <= self.cfg.max_batch_size:
                jobs.append(job)
                images += len(job.items)
            else:
                rest.append(job)
        self.queue = rest
        return Batch(jobs)

    def sample(self, batch: Batch) -> list[list[str]]:
        """One model batch (in its own thread, computing only in its turns) -> each job's images as PNG data URLs."""
        pipe = batch.jobs[0].pipe
        adaptive = pipe.sampling.sampler == "dopri5"

        def callback(info: dict) -> None:
            if self.closed or batch.gone:
                raise Abandoned
            if pipe.device.type == "cuda":  # kernels run ahead of the host: a turn must count the step's real time
                torch.cuda.synchronize(pipe.device)
            seconds = self.turns.step(batch)  # may wait while other batches take their turns
            cost = seconds / batch.images
            self.seconds_per_image_step = cost if self.seconds_per_image_step is None else 0.8 * self.seconds_per_image_step + 0.2 * cost
            batch.step += 1
            if adaptive and info["i"] and batch.step > self.cfg.max_steps:  # info["i"] == 0: it has arrived
                raise ArithmeticError(f"dopri5 did not reach t = 1 within {self.cfg.max_steps} steps, this server's --max-steps: its error "
                                      "estimate does not settle (an extreme guidance scale makes the ODE stiff); use a fixed-step sampler "
                                      "such as heun, or a lower cfg_scale.")  # fmt: skip

        self.turns.enter(batch)
        try:
            generators = [torch.Generator(pipe.device).manual_seed(j.seed) for j in batch.jobs]
            noise = torch.cat([pipe.noise(len(j.items), g) for j, g in zip(batch.jobs, generators)])  # (N, C, H, W)
            items = [item for j in batch.jobs for item in j.items]
            condition = pipe.condition(items) if self.text else torch.tensor(items)
            # A lone job's generator goes on to draw the per-step noise; batched samplers draw none that counts.
            images = to_uint8(pipe.images(condition, noise=noise, generator=generators[0], callback=callback))  # (N, H, W, C), clips (N, T, H, W, C)
        finally:
            self.turns.leave(batch)
        urls, i = [], 0
        for job in batch.jobs:
            urls.append([png_data_url(img) for img in images[i : i + len(job.items)]])
            i += len(job.items)
        return urls

    async def work(self) -> None:
        while True:
            await self.arrived.wait()
            if self.queue:
                # Let a batch gather for batch_window after its first request, unless it is full already.
                wait = self.queue[0].queued + self.cfg.batch_window - time.monotonic()
                if wait > 0 and sum(len(j.items) for j in self.queue) < self.cfg.max_batch_size:
                    await asyncio.sleep(wait)
            await self.slots.acquire()  # meanwhile later requests may join the batch
            batch = self.take_batch()
            if not self.queue:
                self.arrived.clear()
            if batch is None:
                self.slots.release()
                continue
            self.active.append(batch)
            task = asyncio.create_task(self.run(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def run(self, batch: Batch) -> None:
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.sample, batch)
        except Abandoned:  # its requests have gone, or the server is closing: say so to any that wait
            for job in batch.jobs:
                if not job.future.done():
                    job.future.set_exception(Busy("the server is shutting down; retry later.", 5))
            return
        except Exception as e:  # e.g. NaN samples from an extreme guidance scale: those requests fail, the server goes on
            for job in batch.jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        finally:
            self.active.remove(batch)
            self.slots.release()
        self.served["batches"] += 1
        for job, urls in zip(batch.jobs, results):
            if not job.future.done():
                job.future.set_result((urls, batch.images))
                self.served["requests"] += 1
                self.served["images"] += len(urls)

    def close(self) -> None:
        self.closed = True  # running batches stop at their next step, waiting ones at once
        for job in self.queue:
            if not job.future.done():
                job.future.set_exception(Busy("the server is shutting down; retry later.", 5))
        self.queue.clear()
        with self.turns.cond:
            self.turns.cond.notify_all()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict:
        queued = [j for j in self.queue if not j.future.done()]
        return {"queued_requests": len(queued), "queued_images": sum(len(j.items) for j in queued),
                "running": [b.progress() for b in self.active], "served": self.served}  # fmt: skip

    def info(self) -> dict:
        c, s = self.pipe.config, self.pipe.sampling
        kind = objective_name(self.pipe.objective)
        samplers = list(samplers_for(kind))
        defaults = {"prompts": []} if self.text else {"classes": [0]}
        info = {
            "model": describe(c), "objective": kind, "conditioning": "text" if self.text else "class",
            "samplers": samplers, "batch_invariant": [name for name in samplers if name in BATCH_INVARIANT],
            "defaults": {**defaults, "num_samples": 4, "seed": 0, "sampler": s.sampler, "num_sampling_steps": s.steps, "cfg_scale": s.cfg_scale},
            "limits": {"max_samples": self.cfg.max_samples, "max_steps": self.cfg.max_steps, "max_batch_size": self.cfg.max_batch_size,
                       "queue_size": self.cfg.queue_size, "timeout": self.cfg.timeout, "max_body": self.cfg.max_body,
                       "active_batches": self.cfg.active_batches},
        }  # fmt: skip
        if not self.text:
            info["num_classes"] = c.num_real_classes
        return info
