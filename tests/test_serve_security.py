"""The security section of `ditkit serve` (issue 28): what the server refuses before any sampling
(cross-site requests, other host names, large or deeply nested bodies, long echoes), adaptive
solvers bounded and cancellable, work for a client that has gone cancelled, small requests
interleaved with large ones and an honest Retry-After, and a port in use. The text model's
requests and page are in test_serve.py."""

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from test_serve import direct, pixels, post, serving

from ditkit.config import SamplingOptions, ServeConfig
from ditkit.pipeline import load_pipeline
from ditkit.samplers.flow import dopri5

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on busy cores


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(SamplingOptions(ckpt="fashion-mnist-diffusion", device="cpu"))


@pytest.fixture(scope="module")
def flow_pipe():
    return load_pipeline(SamplingOptions(device="cpu"))  # the bundled flow model: dopri5


@pytest.fixture(scope="module")
def http(pipe):
    with serving(pipe) as client:
        yield client


def port_of(client) -> int:
    return client.base_url.port


def raw(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes, then read what the server answers until it closes or `wait` passes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b'"}' in answer:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


def error_of(response) -> str:
    message = response.json()["error"]
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message, message
    return message


def served(client) -> int:
    return client.get("/api/status").json()["served"]["requests"]


def wait_idle(client, within: float) -> float:
    """Seconds until the server samples nothing; fails after `within`."""
    start = time.monotonic()
    while client.get("/api/status").json()["running"]:
        assert time.monotonic() - start < within, "the server kept sampling"
        time.sleep(0.05)
    return time.monotonic() - start


def wait_running(client, within: float = 20.0) -> None:
    start = time.monotonic()
    while not any(b["step"] >= 1 for b in client.get("/api/status").json()["running"]):
        assert time.monotonic() - start < within, "the request did not start"
        time.sleep(0.02)


# -- 1. cross-site requests and DNS rebinding ------------------------------------------------------
def test_a_simple_cross_site_post_is_refused(http):
    """What any web page may send without a preflight: text/plain (or a form) with its Origin."""
    before = served(http)
    body = json.dumps({"classes": [3], "num_sampling_steps": 1})
    r = http.post("/api/generate", content=body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code == 403 and "--allow-origin" in error_of(r)
    r = http.post("/api/generate", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in error_of(r)
    r = http.post("/api/generate", content="classes=3", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = http.post("/api/generate", content=body, headers={"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert r.status_code == 403 and "http://evil.example" in error_of(r)
    assert http.get("/api/info", headers={"Origin": "null"}).status_code == 403
    assert served(http) == before  # nothing was sampled for them
    own = f"http://127.0.0.1:{port_of(http)}"  # the page's own requests carry its origin
    r = http.post("/api/generate", content=body, headers={"Content-Type": "application/json; charset=utf-8", "Origin": own})
    assert r.status_code == 200, r.text


def test_other_host_names_are_refused(http):
    """DNS rebinding: a name that resolves to 127.0.0.1 reaches the server with its own Host."""
    for path in ("/", "/api/info", "/api/status"):
        r = http.get(path, headers={"Host": "evil.example"})
        assert r.status_code == 400 and "evil.example" in error_of(r) and "--allow-host" in r.json()["error"]
    r = http.post("/api/generate", json={"classes": [3], "num_sampling_steps": 1}, headers={"Host": f"evil.example:{port_of(http)}"})
    assert r.status_code == 400
    for host in (f"localhost:{port_of(http)}", f"127.0.0.1:{port_of(http)}", "LOCALHOST"):
        assert http.get("/api/info", headers={"Host": host}).status_code == 200, host


def test_which_host_names_a_server_answers_to():
    from ditkit.serve import Hosts

    loopback = Hosts.of(ServeConfig(device="cpu"))
    assert all(n in loopback for n in ("127.0.0.1", "localhost", "127.0.0.2", "::1"))
    assert not any(n in loopback for n in ("evil.example", "192.168.1.5", socket.gethostname().lower() + ".evil"))
    # Every interface: any address (a rebinding attack needs a name), this machine's names, and the listed ones.
    everywhere = Hosts.of(ServeConfig(device="cpu", host="0.0.0.0", allow_host=("DIT.lab.example",)))
    assert all(n in everywhere for n in ("192.168.1.5", "10.0.0.7", "::1", "localhost", socket.gethostname().lower(), "dit.lab.example"))
    assert "evil.example" not in everywhere
    assert "evil.example" in Hosts.of(ServeConfig(device="cpu", allow_host=("*",)))
    with pytest.raises(ValueError, match="allow-host"):
        ServeConfig(device="cpu", allow_host=("http://dit.lab.example/",))
    with pytest.raises(ValueError, match="allow-origin"):
        ServeConfig(device="cpu", allow_origin=("dit.lab.example",))


def test_allowed_origins_get_cors_answers(pipe):
    app = "http://app.example:3000"
    with serving(pipe, allow_origin=(app,)) as client:
        preflight = client.options("/api/generate", headers={"Origin": app, "Access-Control-Request-Method": "POST",
                                                             "Access-Control-Request-Headers": "content-type"})  # fmt: skip
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == app
        r = client.post("/api/generate", json={"classes": [3], "num_sampling_steps": 1}, headers={"Origin": app})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app
        assert client.post("/api/generate", json={"classes": [3]}, headers={"Origin": "http://evil.example"}).status_code == 403


# -- 2, 3, 8. bodies: size, nesting, echoes ---------------------------------------------------------
def test_a_large_body_is_refused_before_it_is_read(http):
    start = time.monotonic()
    head = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200000000\r\n\r\n")  # fmt: skip
    answer = raw(port_of(http), head + b'{"classes": [' + b"3, " * 300)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-body" in answer and time.monotonic() - start < 5
    # Sent in chunks with no length: read up to the limit, then refused.
    chunks = (b'{"classes": [' + b"3, " * 3000 for _ in range(10))
    r = http.post("/api/generate", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "16384 bytes" in error_of(r)
    assert post(http, {"classes": [3], "num_sampling_steps": 1}).status_code == 200


def test_an_aborted_upload_logs_one_line(http):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        head = b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port_of(http))) as s:
            s.sendall(head + b'{"classes": [3')
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while not records and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and records[0].exc_info is None, [r.getMessage() for r in records]
    assert "went away" in records[0].getMessage() and "\n" not in records[0].getMessage()


LONG = "x" * 12_000
BAD = [
    ("[" * 3000 + "]" * 3000, "nests too deeply"),
    ({"classes": [[[3]]]}, "classes must be"),
    ({"classes": [3] * 17}, "classes has 17 entries"),
    ({"classes": [10**26]}, "class id 100000000000000000000000000 is outside [0, 10)"),
    ({"classes": [3], "sampler": LONG}, "sampler is 'xxxx"),
    ({"classes": [3], "seed": LONG}, "seed must be a whole number"),
    ({"classes": [3], LONG: 1}, "unknown setting(s) xxxx"),
    ({"prompts": ["a dark ankle boot"]}, "this is a class-conditional model"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_bodies_get_one_short_sentence(http, body, message):
    r = post(http, body)
    assert r.status_code == 400, r.text[:300]
    error = error_of(r)
    assert message in error and len(error) < 300, error


# -- 4. adaptive solvers -----------------------------------------------------------------------------
def test_dopri5_is_bounded_and_cancellable():
    calls = []

    def velocity(x, t, y=None):  # a stiff field: dopri5 shrinks its steps forever
        calls.append(1)
        return -1e4 * x

    flow = __import__("ditkit").FlowMatching()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ArithmeticError, match="dopri5 did not reach t = 1 within 20 steps"):
        dopri5(velocity, flow, x, max_steps=20)
    assert len(calls) == 6 * 20 + 2
    seen = []

    def stop(info):
        seen.append(info)
        if len(seen) == 3:
            raise KeyboardInterrupt

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        dopri5(velocity, flow, x, callback=stop)
    assert len(calls) == 6 * 2 + 2 and [s["nfe"] for s in seen] == [2, 8, 14]
    assert seen[0]["x"] is not None and float(seen[0]["t"]) == 0.0


def test_an_adaptive_request_stops_at_max_steps(flow_pipe):
    with serving(flow_pipe, max_steps=10, batch_window=0) as client:
        start = time.monotonic()
        r = post(client, {"classes": [3], "sampler": "dopri5", "cfg_scale": 2000})
        assert r.status_code == 422 and "dopri5 did not reach t = 1 within 10 steps" in error_of(r)
        assert time.monotonic() - start < 20
        assert client.get("/api/status").json()["running"] == []


def test_an_adaptive_request_stops_at_its_deadline(flow_pipe):
    with serving(flow_pipe, timeout=1.0, batch_window=0) as client:
        r = post(client, {"classes": [3], "sampler": "dopri5", "cfg_scale": 2000})
        assert r.status_code == 503 and "deadline" in error_of(r)
        assert wait_idle(client, within=2.0) < 2.0


# -- 5. a client that has gone -------------------------------------------------------------------
def test_the_work_of_a_client_that_went_away_is_cancelled(http):
    body = json.dumps({"classes": [3], "num_samples": 8, "num_sampling_steps": 60}).encode()
    head = f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    before = served(http)
    with socket.create_connection(("127.0.0.1", port_of(http))) as s:
        s.sendall(head.encode() + body)
        wait_running(http)
    assert wait_idle(http, within=2.0) < 2.0  # alone it takes ~10 s
    assert served(http) == before


# -- 6. fairness and Retry-After -------------------------------------------------------------------
def test_a_small_request_is_not_stuck_behind_a_large_one(pipe):
    large = {"classes": [3], "num_samples": 6, "num_sampling_steps": 30, "seed": 1}
    small = {"classes": [5], "num_samples": 1, "num_sampling_steps": 10, "seed": 2}
    with serving(pipe, batch_window=0) as client, ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        big = pool.submit(lambda: (post(client, large), time.monotonic() - start))
        wait_running(client)
        t0 = time.monotonic()
        r_small = post(client, small)
        small_seconds = time.monotonic() - t0
        r_large, large_seconds = big.result()
    assert r_small.status_code == 200 and r_large.status_code == 200
    assert small_seconds < large_seconds / 3, (small_seconds, large_seconds)
    # Interleaved step by step, yet each gets exactly its seed's images, as sampled alone.
    np.testing.assert_array_equal(pixels(r_small), direct(pipe, [5], 2, steps=10))
    np.testing.assert_array_equal(pixels(r_large), direct(pipe, [3] * 6, 1, steps=30))


def test_retry_after_counts_the_queued_work(pipe):
    large = {"classes": [3], "num_samples": 6, "num_sampling_steps": 30}
    with serving(pipe, queue_size=1, active_batches=1, batch_window=0) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, client, large)
        wait_running(client)
        queued = pool.submit(post, client, {"classes": [3], "num_sampling_steps": 2})
        while client.get("/api/status").json()["queued_requests"] < 1:
            time.sleep(0.02)
        t0 = time.monotonic()
        busy = post(client, {"classes": [3], "num_sampling_steps": 2})
        assert busy.status_code == 503
        retry = int(busy.headers["Retry-After"])
        assert first.result().status_code == 200 and queued.result().status_code == 200
        drained = time.monotonic() - t0
    assert 0.5 * drained <= retry <= 2 * drained + 2, (retry, drained)
    assert f"retry in {retry} s" in busy.json()["error"]


# -- 8. a port in use ----------------------------------------------------------------------------------
def test_a_port_in_use_is_said_before_serving(capsys):
    from ditkit import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--device", "cpu", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out
    assert f"port {port} on 127.0.0.1 is in use" in err and err.count("\n") == 1
