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

from __future__ import annotations

import asyncio
import base64
import errno
import io
import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from PIL import Image

from .checkpoints import describe
from .config import SAMPLER_OBJECTIVE, GenerateRequest, ServeConfig
from .objectives import objective_name
from .pipeline import Pipeline, load_pipeline
from .utils.images import to_uint8

PAGE = Path(__file__).parent / "serve_static" / "index.html"
# Samplers whose per-sample result does not depend on the rest of the batch (see the module docstring).
BATCH_INVARIANT = frozenset({"ddim", "dpm++2m", "unipc", "euler", "heun", "heun2"})
QUOTE = 40  # characters of a bad value an error message quotes back
log = logging.getLogger("uvicorn.error")  # the server's log, which uvicorn prints


class Busy(Exception):
    """The server cannot take or finish a request now; `retry_after` seconds is its estimate."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Abandoned(Exception):
    """Every request of a batch has gone (deadline passed, client left), or the server is closing: stop sampling it."""


class Refused(Exception):
    """A request the server does not take: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


# -- what the server answers to ------------------------------------------------------------------
def host_name(header: str) -> str:
    """The Host header without its port, lower case: "[::1]:7860" -> "::1"."""
    name = header[1 : header.find("]")] if header.startswith("[") else header.rsplit(":", 1)[0]
    return name.lower().rstrip(".")


def address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class Hosts:
    """The host names a server answers to. DNS rebinding points another site's name at this machine,
    so that site's pages reach the server with their own name in Host: only names that are this
    server's are taken. Listening on loopback: localhost and loopback addresses. Listening on other
    addresses: any address (an address cannot be rebound), localhost, this machine's name and the
    address listened on. And --allow-host's names (a DNS name or a reverse proxy's) everywhere."""

    loopback: bool
    names: frozenset[str]
    any_name: bool

    @classmethod
    def of(cls, cfg: ServeConfig) -> Hosts:
        host = cfg.host.lower()
        loopback = host == "localhost" or bool((a := address(host)) and a.is_loopback)
        names = {"localhost", *(h.lower() for h in cfg.allow_host)}
        if not loopback:
            names |= {host, socket.gethostname().lower()}
        return cls(loopback, frozenset(names), "*" in cfg.allow_host)

    def __contains__(self, name: str) -> bool:
        if self.any_name or name in self.names:
            return True
        ip = address(name)
        return ip is not None and (ip.is_loopback or not self.loopback)


def clip(value, n: int = QUOTE) -> str:
    """At most `n` characters of a value quoted back to a client."""
    text = str(value)
    return text if len(text) <= n else text[: n - 1] + "…"


# A list repr, a quoted string repr, or any other word: what an error message may quote at length.
_QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
_TOKEN = re.compile(rf"\[(?:{_QUOTED}|[^\[\]'\"])*\]|{_QUOTED}|\S+")


def _cut(token: str) -> str:
    if len(token) <= QUOTE:
        return token
    end = {"'": "'", '"': '"', "[": "]"}.get(token[0], "")
    return token[: QUOTE - 1 - len(end)] + "…" + end


def api_message(error: Exception) -> str:
    """One sentence for the API: the first line, flags named as the API's fields (--num-sampling-steps
    -> num_sampling_steps), and every quoted value, list or word over a few dozen characters cut short."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), text)
    text = _TOKEN.sub(lambda m: _cut(m.group()), text)
    return text if len(text) <= 10 * QUOTE else text[: 10 * QUOTE - 1] + "…"  # many short words: still a sentence, not a page


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
    """(H, W, C) uint8 -> a data: URL of a PNG (grayscale for one channel)."""
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
                raise ValueError('this is a text-to-image model: it takes prompts, not class ids; send {"prompts": ["a dark ankle boot"]}.')
            if not req.prompts:
                raise ValueError('prompts is required: a list of texts such as {"prompts": ["a dark ankle boot"]}.')
            return list(req.prompts)
        if req.prompts:
            raise ValueError('this is a class-conditional model: it takes class ids, not prompts; send {"classes": [3]}.')
        n = self.pipe.config.num_classes
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
            images = to_uint8(pipe.images(condition, noise=noise, generator=generators[0], callback=callback))  # (N, H, W, C)
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
        samplers = [name for name, objective in SAMPLER_OBJECTIVE.items() if objective == kind]
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
            info["num_classes"] = c.num_classes
        return info


# -- the app ---------------------------------------------------------------------------------------
async def read_body(request, limit: int) -> bytes:
    """The body, read in chunks and given up on as soon as it passes `limit` bytes."""
    too_large = Refused(413, f"the request body is over this server's limit of {limit} bytes (--max-body); send fewer or shorter values.",
                        {"Connection": "close"})  # fmt: skip
    length = request.headers.get("content-length", "")
    if length.isdigit() and (len(length) > 12 or int(length) > limit):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def make_app(pipe: Pipeline, cfg: ServeConfig):
    """The Starlette app: the page, /api/info, /api/status and POST /api/generate, behind the guard."""
    from starlette.applications import Starlette
    from starlette.datastructures import Headers
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    state: dict = {}
    page = PAGE.read_text()
    hosts = Hosts.of(cfg)
    origins = {o.lower() for o in cfg.allow_origin}

    def error(status: int, message: str, retry_after: int | None = None, headers: dict | None = None) -> JSONResponse:
        headers = {**(headers or {}), **({"Retry-After": str(retry_after)} if retry_after is not None else {})}
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def guard(app):
        """Refuses, before any route runs, a request for a host name this server does not answer to,
        and one from another site's page (a browser sends the page's Origin)."""

        async def guarded(scope, receive, send):
            if scope["type"] == "http":
                headers = Headers(scope=scope)
                host, origin = headers.get("host", ""), headers.get("origin")
                if host_name(host) not in hosts:
                    response = error(400, f"this server does not answer to the host name {clip(host_name(host))!r} (a guard against "
                                          "DNS rebinding); open it by its address, or start it with --allow-host NAME if the name is yours.")  # fmt: skip
                    return await response(scope, receive, send)
                if origin is not None and origin.lower() not in (f"http://{host}".lower(), f"https://{host}".lower()) \
                        and origin.lower() not in origins and "*" not in origins:  # fmt: skip
                    response = error(403, f"requests from the pages of another site ({clip(origin)}) are refused; start ditkit serve "
                                          f"with --allow-origin {clip(origin)} if that site is yours.")  # fmt: skip
                    return await response(scope, receive, send)
            await app(scope, receive, send)

        return guarded

    async def generate(request):
        batcher: Batcher = state["batcher"]
        try:
            if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                raise Refused(415, "the API takes JSON only: send the body with Content-Type: application/json.")
            body = await read_body(request, cfg.max_body)
            job = batcher.parse(body)
        except Refused as e:
            return error(e.status, str(e), headers=e.headers)
        except ValueError as e:
            return error(400, api_message(e))
        except ClientDisconnect:
            log.warning("a client went away while sending its request to /api/generate; nothing was sampled for it.")
            return Response(status_code=400)
        start = time.monotonic()
        job.future = asyncio.get_running_loop().create_future()
        try:
            batcher.submit(job)
        except Busy as e:
            return error(503, str(e), e.retry_after)
        # With the body read, the next message is http.disconnect, when the client goes.
        gone = asyncio.ensure_future(request.receive())
        try:
            await asyncio.wait({job.future, gone}, timeout=cfg.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():  # the client went away or the deadline passed: the worker drops the job
            job.future.cancel()
            if gone.done() and not gone.cancelled():
                return Response(status_code=400)  # nobody reads it
            wait = batcher.retry_after()
            return error(503, f"the images were not ready within the server's {cfg.timeout:g} s deadline; retry in {wait} s.", wait)
        try:
            urls, batch_images = job.future.result()
        except Busy as e:
            return error(503, str(e), e.retry_after)
        except ArithmeticError as e:  # sampling went to NaN, or dopri5 did not settle: a setting of this request
            return error(422, api_message(e))
        except Exception as e:
            return error(500, f"sampling failed ({type(e).__name__}: {api_message(e)}); the server goes on serving.")
        s = job.pipe.sampling
        conditions = {"prompts": job.items} if batcher.text else {"labels": job.items}
        return JSONResponse({
            "images": urls, **conditions, "seed": job.seed, "sampler": s.sampler, "num_sampling_steps": s.steps,
            "cfg_scale": s.cfg_scale, "seconds": round(time.monotonic() - start, 3), "batch_images": batch_images,
        })  # fmt: skip

    async def info(request):
        return JSONResponse(state["batcher"].info())

    async def status(request):
        return JSONResponse(state["batcher"].status())

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
    middleware = [Middleware(guard)]
    if cfg.allow_origin:  # the pages of the named sites may read the answers (and send JSON, after a preflight)
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cfg.allow_origin), allow_methods=["GET", "POST"],
                                     allow_headers=["Content-Type"], max_age=600))  # fmt: skip
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or one sentence saying why not (a port in use, an address
    that is not this machine's), before the model is loaded and before anything claims to serve."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise ValueError(f"cannot listen on {host!r}: it is not an address or a name of this machine; pass --host 127.0.0.1 "
                         "(this machine only) or 0.0.0.0 (every interface).") from None  # fmt: skip
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(where)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use (another ditkit serve?); pass --port with a free one, or stop what holds it.") from None
        if e.errno == errno.EACCES:
            raise ValueError(f"port {port} needs administrator rights; pass --port 1024 or above.") from None
        raise ValueError(f"cannot listen on {host} port {port} ({e.strerror}); pass --host with an address of this machine.") from None
    return sock


def run_serve(cfg: ServeConfig) -> None:
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError("ditkit serve needs starlette and uvicorn; pip install 'ditkit[serve]'.") from None
    sock = listen(cfg.host, cfg.port)
    try:
        pipe = load_pipeline(cfg)
        check_limits(pipe, cfg)
        app = make_app(pipe, cfg)
        print(f"serving {describe(pipe.config)} ({pipe.sampling.describe()}) at http://{cfg.host}:{cfg.port}/ "
              f"(batches of up to {cfg.max_batch_size} images, queue {cfg.queue_size}, deadline {cfg.timeout:g} s)", flush=True)  # fmt: skip
        if not Hosts.of(cfg).loopback and "*" not in cfg.allow_host:
            print(f"answering to this machine's addresses, localhost and {socket.gethostname()}; other names (DNS, a proxy's) need --allow-host", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    finally:
        sock.close()
