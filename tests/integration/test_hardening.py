"""One bad or slow client must never hurt the others: limits a client cannot exceed, slow readers, faults
injected into one request, and the security defaults, each against a real server process over real sockets.
Expected texts come from a plain greedy loop over the model (tests/helpers.py::greedy)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from aetheris.serverproc import ROOT, ServerProcess, free_port
from model.checkpoint import load_model
from tests.helpers import greedy, make_tiny_checkpoint

MODEL = "tiny"
FOREVER = {"max_tokens": 100_000, "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL)


@pytest.fixture(scope="module")
def reference(ckpt):
    return load_model(ckpt)


def chat(content: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def raw_request(port: int, path: str, body: bytes, headers: str = "", rcvbuf: int | None = None) -> socket.socket:
    """Send a request over a plain socket and return it unread (a client that may never read)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small TCP window
    sock.connect(("127.0.0.1", port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
    sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


# ---------------------------------------------------------------- limits a client cannot exceed
@pytest.fixture(scope="module")
def limited(ckpt):
    s = ServerProcess(
        ckpt,
        *("--max-batch-size", "2", "--max-queue", "0", "--max-tokens-limit", "100000"),
        *("--max-prompt-tokens", "64", "--request-timeout", "1"),
    )
    yield s
    s.stop()


def test_max_tokens_over_the_limit_is_a_400(limited):
    r = httpx.post(limited.url + "/v1/chat/completions", json=chat("x", max_tokens=100_001), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_prompt_over_max_prompt_tokens_is_a_400(limited):
    r = httpx.post(limited.url + "/v1/completions", json={"model": MODEL, "prompt": list(range(65))}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    ok = httpx.post(limited.url + "/v1/completions", json={"model": MODEL, "prompt": list(range(64))}, timeout=30)
    assert ok.status_code == 200


def test_request_timeout_ends_with_length_and_usage(limited):
    """100,000 tokens take minutes; the 1 s deadline ends the request with what it has, as max_tokens would."""
    t0 = time.time()
    r = httpx.post(limited.url + "/v1/chat/completions", json=chat("go on", **FOREVER), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < 100_000 and time.time() - t0 < 30
    assert len(body["choices"][0]["message"]["content"]) > 0
    wait_for(lambda: limited.metrics()["aetheris_slots_used"] == 0, what="the slot to be freed")


def test_max_queue_zero_serves_free_slots_and_refuses_waiting(limited):
    """--max-queue 0: no request waits, but one that finds a free slot is served."""
    r = httpx.post(limited.url + "/v1/chat/completions", json=chat("hello", max_tokens=3), timeout=30)
    assert r.status_code == 200

    async def run():
        async with httpx.AsyncClient(base_url=limited.url, timeout=30) as c:
            holders = []
            for _ in range(2):  # both slots, each held until the 1 s deadline
                cm = c.stream("POST", "/v1/chat/completions", json=chat("hold", stream=True, **FOREVER))
                assert (await cm.__aenter__()).status_code == 200
                holders.append(cm)
            while limited.metrics()["aetheris_slots_used"] < 2:
                await asyncio.sleep(0.02)
            over = await c.post("/v1/chat/completions", json=chat("one more", max_tokens=2))
            for cm in holders:
                await cm.__aexit__(None, None, None)
            return over

    over = asyncio.run(run())
    assert over.status_code == 503 and over.headers["retry-after"] == "1"
    assert over.json()["error"]["code"] == "server_overloaded"


# ---------------------------------------------------------------- slow readers, queue bounded in tokens
@pytest.fixture(scope="module")
def slow(ckpt):
    s = ServerProcess(
        ckpt,
        *("--send-timeout", "1", "--max-batch-size", "4", "--max-queue", "1", "--max-queue-tokens", "40"),
        *("--max-tokens-limit", "100000"),
    )
    yield s
    s.stop()


def test_a_client_that_stops_reading_is_aborted_and_memory_stays_flat(slow):
    """The kernel's send buffer (up to 4 MiB) fills first; 4 choices of 20 logprobs make that seconds."""
    body = json.dumps(chat("never read", n=4, stream=True, logprobs=True, top_logprobs=20, **FOREVER)).encode()
    proc = psutil.Process(slow.proc.pid)
    sock = raw_request(slow.port, "/v1/chat/completions", body, rcvbuf=4096)
    try:
        wait_for(lambda: slow.metrics()["aetheris_slots_used"] == 4, what="decoding to start")
        rss_start = proc.memory_info().rss
        wait_for(lambda: slow.metrics()["aetheris_slots_used"] == 0, timeout=60, what="the stalled stream's slot")
        time.sleep(1.0)
        grown = proc.memory_info().rss - rss_start
        assert grown < 32 << 20, f"server RSS grew {grown / 2**20:.1f} MiB behind a client that reads nothing"
    finally:
        sock.close()
    r = httpx.post(slow.url + "/v1/chat/completions", json=chat("next", max_tokens=3), timeout=30)
    assert r.status_code == 200


def test_waiting_queue_is_bounded_in_tokens(slow):
    """Every slot held; a short request may wait (--max-queue 1), a 50-token one may not (--max-queue-tokens 40)."""

    async def run():
        async with httpx.AsyncClient(base_url=slow.url, timeout=30) as c:
            cm = c.stream(
                "POST", "/v1/completions", json={"model": MODEL, "prompt": [5], "n": 4, "stream": True, **FOREVER}
            )
            assert (await cm.__aenter__()).status_code == 200
            while slow.metrics()["aetheris_slots_used"] < 4:
                await asyncio.sleep(0.02)
            big = await c.post("/v1/completions", json={"model": MODEL, "prompt": list(range(50)), "max_tokens": 2})
            small = asyncio.create_task(
                c.post("/v1/completions", json={"model": MODEL, "prompt": [7, 8], "max_tokens": 2})
            )
            await asyncio.sleep(0.5)
            await cm.__aexit__(None, None, None)  # frees the slot: the small one runs
            return big, await small

    big, small = asyncio.run(run())
    assert big.status_code == 503 and big.json()["error"]["code"] == "server_overloaded"
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------- faults stay with their request
FAULTS = {"prefill": 101, "nan": 102, "sampler": 103, "token": 104}


@pytest.fixture(scope="module")
def faulty(ckpt):
    spec = ",".join(f"{k}={v}" for k, v in FAULTS.items()) + ",step=105,hang=106:4,die=107"
    s = ServerProcess(ckpt, "--watchdog-s", "1", "--max-batch-size", "8", env={"AETHERIS_FAULTS": spec})
    yield s
    s.stop()


def assert_openai_error(body: dict, status: int = 500) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("server_error" if status == 500 else err["type"])


@pytest.mark.parametrize("point", list(FAULTS))
def test_a_fault_fails_its_request_and_the_others_carry_on(faulty, reference, point):
    """A faulty request among calm ones: it gets a 500 OpenAI error (or an error event in its stream); each
    calm request, batched with it, gets exactly its greedy text."""
    model, tok = reference
    calm = [chat(f"A calm request {i}.", max_tokens=12, temperature=0) for i in range(3)]
    bad = chat("bad", seed=FAULTS[point], max_tokens=20, ignore_eos=True)

    async def run():
        async with httpx.AsyncClient(base_url=faulty.url, timeout=60) as c:
            post = lambda b: c.post("/v1/chat/completions", json=b)  # noqa: E731
            return await asyncio.gather(post(calm[0]), post(bad), post(calm[1]), post({**bad, "stream": True}))

    a, failed, b, stream = asyncio.run(run())
    for r, body in ((a, calm[0]), (b, calm[1])):
        assert r.status_code == 200, r.text
        want = greedy(model, tok, tok.encode_chat(body["messages"]), 12)
        assert r.json()["choices"][0]["message"]["content"] == want
    assert failed.status_code == 500 and failed.headers["x-should-retry"] == "false"
    assert_openai_error(failed.json())
    events = [e[6:] for e in stream.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    wait_for(lambda: faulty.metrics()["aetheris_slots_used"] == 0, what="every slot to be freed")


def test_a_failed_decode_step_fails_its_requests_and_the_engine_goes_on(faulty, reference):
    model, tok = reference
    failed = httpx.post(faulty.url + "/v1/chat/completions", json=chat("x", seed=105, max_tokens=5), timeout=60)
    assert failed.status_code == 500
    assert_openai_error(failed.json())
    body = chat("after the failure", max_tokens=8, temperature=0)
    r = httpx.post(faulty.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == greedy(model, tok, tok.encode_chat(body["messages"]), 8)
    assert httpx.get(faulty.url + "/health").status_code == 200


def test_health_turns_503_while_the_engine_is_stalled(faulty):
    """An iteration that hangs 4 s with --watchdog-s 1: /health is 503 during it and 200 after."""

    async def run():
        async with httpx.AsyncClient(base_url=faulty.url, timeout=60) as c:
            hung = asyncio.create_task(c.post("/v1/chat/completions", json=chat("x", seed=106, max_tokens=2)))
            codes = []
            while not hung.done():
                h = await c.get("/health")
                codes.append(h.status_code if h.status_code == 200 else h.json()["error"]["code"])
                await asyncio.sleep(0.2)
            return (await hung).status_code, codes, (await c.get("/health")).status_code

    status, codes, after = asyncio.run(run())
    assert status == 200 and "engine_stalled" in codes and after == 200


def test_a_dead_engine_fails_its_requests_and_health_says_so(faulty):
    """Last in this module: it ends the engine thread for good."""
    r = httpx.post(faulty.url + "/v1/chat/completions", json=chat("x", seed=107, max_tokens=2), timeout=60)
    assert r.status_code == 500
    assert_openai_error(r.json())
    h = httpx.get(faulty.url + "/health")
    assert h.status_code == 503 and h.json()["error"]["code"] == "engine_dead"


# ---------------------------------------------------------------- security defaults
@pytest.fixture(scope="module")
def secured(ckpt):
    s = ServerProcess(ckpt, "--api-key", "k3y", "--metrics-require-key", "--cache-isolation")
    yield s
    s.stop()


KEY = {"Authorization": "Bearer k3y"}


def test_the_api_key_is_checked_before_the_body_is_read(secured):
    """Headers announce a 1 MB body that never comes: without the key the answer is 401 at once."""
    sock = socket.socket()
    sock.settimeout(5)
    sock.connect(("127.0.0.1", secured.port))
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall((head + "Content-Length: 1000000\r\n\r\n").encode())
    try:
        answer = sock.recv(4096).decode()
    finally:
        sock.close()
    assert answer.startswith("HTTP/1.1 401")


def test_docs_schema_and_metrics_need_the_key(secured):
    for path in ("/docs", "/redoc", "/openapi.json", "/metrics", "/v1/models"):
        assert httpx.get(secured.url + path).status_code == 401, path
        assert httpx.get(secured.url + path, headers=KEY).status_code == 200, path
    assert httpx.get(secured.url + "/health").status_code == 200


def test_cache_isolation_keeps_tenants_apart(secured):
    """The same long prompt from another tenant reuses nothing; from the same tenant, its snapshot."""
    body = chat("A system prompt shared by nobody. " * 8, max_tokens=2)

    def cached(tenant: str) -> int:
        r = httpx.post(secured.url + "/v1/chat/completions", json=body, headers={**KEY, "X-Tenant-ID": tenant})
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("alice") == 0
    assert cached("bob") == 0
    assert cached("alice") > 0


def test_a_model_that_fails_to_load_ends_the_process(tmp_path):
    """Non-zero exit and one line naming the cause, not a server answering 503 forever."""
    missing = tmp_path / "no-such-checkpoint"
    missing.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--model", str(missing), "--port", str(free_port()), "--host", "127.0.0.1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in proc.stderr.splitlines() if "could not load the model" in line]
    assert proc.returncode != 0 and len(lines) == 1 and str(missing) in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_device_failure_stops_the_engine_and_the_process(ckpt):
    """A CUDA error (injected on CPU: the decode step raises torch.AcceleratorError) poisons the device for
    every later step: the request fails, /health says engine_dead, and the process exits non-zero so that an
    orchestrator restarts it, instead of a server that answers 200 to /health and fails every request."""
    s = ServerProcess(ckpt, env={"AETHERIS_FAULTS": "device=108"})
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json=chat("x", seed=108, max_tokens=4), timeout=60)
        assert r.status_code == 500
        assert_openai_error(r.json())
        h = httpx.get(s.url + "/health", timeout=5)
        assert h.status_code == 503 and h.json()["error"]["code"] == "engine_dead"
        assert s.proc.wait(timeout=30) == 1
        assert "the engine thread stopped (AcceleratorError: CUDA error" in s.output()
    finally:
        s.stop()
