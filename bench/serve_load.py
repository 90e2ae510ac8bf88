"""Load test of `ditkit serve` on 127.0.0.1: many concurrent clients against dynamic batching,
and the same requests served one at a time.

Starts a server per phase itself (`python -m ditkit serve` from this checkout), sends a bounded
number of requests, stops the server and prints a table: requests answered 200, failed (any other
status) and lost (no answer), throughput, latency percentiles, the server's mean model batch, and
whether the requests of both phases with the same seed got the same images. The one-at-a-time
phase runs before and after the batching phase, so a change in the machine's load shows.

    python bench/serve_load.py                                  # 100 clients x 2 requests, 10 one at a time
    python bench/serve_load.py --clients 100 --requests 2 --sequential 10 --steps 25 --threads 1 --json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # the only address this script talks to


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`python -m ditkit serve` in a subprocess on a free port of 127.0.0.1, stopped on exit."""

    def __init__(self, flags: list[str], log: Path, threads: int | None):
        self.port, self.log = free_port(), log
        self.env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.flags = ["--host", HOST, "--port", str(self.port), *flags]
        self.url = f"http://{HOST}:{self.port}"

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "ditkit", "serve", *self.flags], cwd=ROOT, env=self.env,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                self.info = httpx.get(self.url + "/api/info", timeout=5).json()
                return self
            except httpx.HTTPError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("the server did not answer within 300 s.")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def request_body(i: int, num_classes: int, args) -> dict:
    """Request i: one class and seed of its own, the same in every phase."""
    body = {"classes": [i % num_classes], "seed": i, "num_samples": args.num_samples}
    if args.steps:
        body["num_sampling_steps"] = args.steps
    return body


def first_image(data: dict) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(data["images"][0].split(",", 1)[1]))))


async def run_phase(url: str, clients: int, per_client: int, num_classes: int, args) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests one after another."""
    results: dict[int, tuple] = {}  # request id -> (status, seconds, first image or None)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.client_timeout, limits=limits) as http:

        async def client(k: int) -> None:
            for j in range(per_client):
                i = k * per_client + j
                start = time.perf_counter()
                try:
                    r = await http.post("/api/generate", json=request_body(i, num_classes, args))
                    ok = r.status_code == 200
                    results[i] = (r.status_code, time.perf_counter() - start, first_image(r.json()) if ok else None)
                except httpx.HTTPError as e:
                    results[i] = (type(e).__name__, time.perf_counter() - start, None)

        start = time.perf_counter()
        tasks = [asyncio.create_task(client(k)) for k in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
        for task in pending:  # the time budget ran out: what is unanswered counts as lost
            task.cancel()
        wall = time.perf_counter() - start
        served = (await http.get("/api/status")).json()["served"]
    total = clients * per_client
    latencies = np.array([s for code, s, _ in results.values() if code == 200])
    ok = len(latencies)
    return {
        "clients": clients, "requests": total, "ok": ok,
        "failed": sum(1 for code, _, _ in results.values() if code != 200), "lost": total - len(results),
        "seconds": wall, "throughput": ok / wall,
        **{f"p{q}": float(np.percentile(latencies, q)) if ok else float("nan") for q in (50, 90, 99)},
        "max": float(latencies.max()) if ok else float("nan"), "load": machine_load(),
        "mean_batch": served["images"] / max(1, served["batches"]),
        "images": {i: img for i, (code, _, img) in results.items() if img is not None},
    }  # fmt: skip


def machine_load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100, help="concurrent clients of the batching phase")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--sequential", type=int, default=10, help="requests of the one-at-a-time phase (the first of the batching phase's)")
    p.add_argument("--num-samples", type=int, default=1, help="images per request")
    p.add_argument("--steps", type=int, default=None, help="sampling steps per request (default: the model's)")
    p.add_argument("--max-batch-size", type=int, default=64, help="the batching server's --max-batch-size")
    p.add_argument("--batch-window", type=float, default=0.05, help="the batching server's --batch-window")
    p.add_argument("--timeout", type=float, default=600.0, help="both servers' request deadline (--timeout)")
    p.add_argument("--client-timeout", type=float, default=900.0, help="seconds a client waits for an answer")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="time budget of each phase; unanswered requests count as lost")
    p.add_argument("--ckpt", default=None, help="checkpoint to serve (default: the bundled model)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the servers (default: torch's, one per core)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()

    common = ["--device", "cpu", "--timeout", str(args.timeout), "--queue-size", str(max(256, args.clients * 2))]
    common += ["--ckpt", args.ckpt] if args.ckpt else []
    one_flags = common + ["--max-batch-size", "1", "--batch-window", "0"]
    batching = common + ["--max-batch-size", str(args.max_batch_size), "--batch-window", str(args.batch_window)]
    runs = [("one at a time (max batch 1)", one_flags, 1, args.sequential),
            (f"dynamic batching (max batch {args.max_batch_size}, window {args.batch_window:g} s)", batching, args.clients, args.requests),
            ("one at a time, again", one_flags, 1, args.sequential)]  # fmt: skip
    phases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, flags, clients, per_client) in enumerate(runs):
            with Server(flags, Path(tmp) / f"server{k}.log", args.threads) as server:
                num_classes, defaults = server.info["num_classes"], server.info["defaults"]
                phases[name] = asyncio.run(run_phase(server.url, clients, per_client, num_classes, args))
    one, many, again = phases.values()
    shared = sorted(set(one["images"]) & set(many["images"]))
    diffs = [int(np.abs(one["images"][i].astype(int) - many["images"][i]).max()) for i in shared]
    steps = args.steps or defaults["num_sampling_steps"]
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, OMP_NUM_THREADS {args.threads or 'unset'}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "request": f"{args.num_samples} image(s), {defaults['sampler']} {steps} steps, cfg {defaults['cfg_scale']:g}",
        "speedup": many["throughput"] / ((one["throughput"] + again["throughput"]) / 2),
        "same_seed_same_images": f"{sum(d <= 1 for d in diffs)}/{len(diffs)} within one level (max difference {max(diffs, default=0)})",
        "phases": {k: {f: v for f, v in r.items() if f != "images"} for k, r in phases.items()},
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"machine: {summary['machine']}; {summary['date']}")
    print(f"each request: {summary['request']}")
    print("| phase | clients | requests | ok | failed | lost | req/s | p50 s | p90 s | p99 s | max s | mean model batch | load average after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in summary["phases"].items():
        print(f"| {name} | {r['clients']} | {r['requests']} | {r['ok']} | {r['failed']} | {r['lost']} | {r['throughput']:.2f} | "
              f"{r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {r['mean_batch']:.1f} | {r['load']} |")  # fmt: skip
    print(f"throughput, batching / one at a time (mean of both): {summary['speedup']:.1f}x")
    print(f"same seed, same image in both phases: {summary['same_seed_same_images']}")


if __name__ == "__main__":
    main()
