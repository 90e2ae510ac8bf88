"""The Starlette app of `ditkit serve` (the page, /api/info, /api/status, POST /api/generate), and
`run_serve`, which binds the port before it loads the model."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path

from ..checkpoints import describe
from ..config import ServeConfig
from ..pipeline import Pipeline, load_pipeline
from .batcher import Batcher, Busy, check_limits, log
from .guard import Hosts, Refused, api_message, clip, host_name, read_body

PAGE = Path(__file__).parent.parent / "serve_static" / "index.html"


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
        print(f"serving {describe(pipe.config)} ({pipe.describe_sampling()}) at http://{cfg.host}:{cfg.port}/ "
              f"(batches of up to {cfg.max_batch_size} images, queue {cfg.queue_size}, deadline {cfg.timeout:g} s)", flush=True)  # fmt: skip
        if not Hosts.of(cfg).loopback and "*" not in cfg.allow_host:
            print(f"answering to this machine's addresses, localhost and {socket.gethostname()}; other names (DNS, a proxy's) need --allow-host", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    finally:
        sock.close()
