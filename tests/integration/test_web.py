"""The chat page at /, driven in headless Chromium (Debian's /usr/bin/chromium) through Playwright, against real
server processes: the embedded default model for the conversation (its screenshot is saved to artifacts/, path
printed), a tiny random model whose greedy reply never ends for the Stop test."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from aetheris.serverproc import ServerProcess
from model.checkpoint import load_model
from tests.helpers import make_tiny_checkpoint

CHROMIUM = os.environ.get("AETHERIS_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-test.txt)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("web") / "tiny")


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(None)  # the embedded default model, served as aetheris-hybrid, no key (a Space's default)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny_server(ckpt):
    s = ServerProcess(ckpt, "--api-key", "k3y")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (done by .ci/run)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def _open(browser, server, model_name: str, api_key: str | None = None):
    context = browser.new_context(viewport={"width": 390, "height": 780})  # a phone-width screen
    if api_key:  # a returning visitor: the key field remembers the key (localStorage)
        context.add_init_script(f"localStorage.setItem('aetheris_api_key', {api_key!r})")
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    external = []
    page.on("request", lambda r: not r.url.startswith(server.url) and external.append(r.url))
    page.external_requests = external
    page.goto(server.url + "/")
    page.click("summary")  # open the settings panel
    page.wait_for_function(f"document.getElementById('model').textContent === 'model: {model_name}'")
    return context, page


@pytest.fixture
def page(browser, server):
    context, page = _open(browser, server, "aetheris-hybrid")
    yield page
    context.close()


@pytest.fixture
def tiny_page(browser, tiny_server):
    context, page = _open(browser, tiny_server, "tiny", api_key="k3y")
    assert page.input_value("#api_key") == "k3y"
    yield page
    context.close()


def _greedy_runs_long(ckpt, n: int = 300) -> str:
    """A user message whose greedy reply from the tiny random model runs n tokens without a stop token."""
    model, tok = load_model(ckpt)
    for i in range(50):
        text = f"Tell me a very long story, take {i}."
        logits, state = model.prefill(
            torch.tensor([tok.encode_chat([{"role": "user", "content": text}])]), model.empty_state(1)
        )
        for _ in range(n):
            t = int(logits[0, : tok.vocab_size].argmax())
            if t in tok.stop_token_ids:
                break
            logits, state = model.decode(torch.tensor([t]), state)
        else:
            return text
    raise AssertionError("no prompt with a long greedy reply")


def _send(page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def _wait_done(page, timeout: float = 60) -> None:
    page.wait_for_function("!document.getElementById('send').disabled", timeout=timeout * 1000)


def test_page_streams_and_keeps_the_conversation(page):
    assert page.title() == "Aetheris" and page.console_errors == []
    # Record every change of the reply's text: a streamed reply grows in several steps.
    page.fill("#max_tokens", "60")
    page.fill("#temperature", "0")
    page.evaluate("""() => {
        window.growth = [];
        new MutationObserver(() => {
            const last = [...document.querySelectorAll('.assistant')].pop();
            if (last) window.growth.push(last.textContent.length);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    _send(page, "Tell me a story about a little cat.")
    _wait_done(page)
    growth = page.evaluate("window.growth")
    assert len(set(g for g in growth if g > 0)) >= 3, growth
    first = page.locator(".assistant").nth(0).text_content()
    assert first and "tokens/s" in page.text_content("#stats")
    # Second turn: the page sends the history; the server reuses the first turn's state.
    _send(page, "And then what happened?")
    _wait_done(page)
    assert page.locator(".user").count() == 2 and page.locator(".assistant").count() == 2
    stats = page.text_content("#stats")
    cached = int(stats.split(" prompt tokens cached")[0].split("· ")[-1].split("/")[0])
    assert cached > 0, stats
    assert page.console_errors == [] and page.external_requests == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling on a phone
    page.click("summary")  # fold the settings away for the picture
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")


def test_stop_aborts_the_request_on_the_server(tiny_page, tiny_server, ckpt):
    page, server = tiny_page, tiny_server
    prompt = _greedy_runs_long(ckpt)
    page.fill("#max_tokens", "4000")
    page.fill("#temperature", "0")
    _send(page, prompt)
    page.wait_for_function("(document.querySelector('.assistant')?.textContent.length ?? 0) > 20")
    page.click("#stop")
    _wait_done(page, timeout=10)
    assert page.text_content("#stats") == "stopped"
    deadline = time.time() + 10
    while time.time() < deadline:
        m = server.metrics()
        if m["aetheris_requests_running"] == 0 and m["aetheris_slots_used"] == 0:
            break
        time.sleep(0.1)
    assert m["aetheris_requests_running"] == 0 and m["aetheris_slots_used"] == 0
    assert m["aetheris_generation_tokens_total"] < 4000  # stopped long before max_tokens
    assert page.console_errors == []


def test_model_output_is_text_not_html(tiny_page):
    """The reply is served by a canned stream containing markup: it must appear literally."""
    page = tiny_page
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b>bold</b>'
    body = (
        "".join(
            f'data: {{"id":"x","object":"chat.completion.chunk","created":0,"model":"tiny","choices":[{{"index":0,'
            f'"delta":{{"content":{__import__("json").dumps(piece)}}},"finish_reason":null}}]}}\n\n'
            for piece in (evil[:20], evil[20:])
        )
        + "data: [DONE]\n\n"
    )
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body),
    )
    _send(page, "Say something with HTML in it.")
    _wait_done(page)
    assert page.locator(".assistant").text_content() == evil
    assert page.locator(".assistant b").count() == 0 and page.locator(".assistant img").count() == 0
    assert page.evaluate("window.pwned") is None


def test_health_endpoint_still_open(tiny_server):
    """With --api-key the health check and the page answer without it; the API does not (tests/server/api/
    test_middleware.py checks every route in-process)."""
    health = httpx.get(tiny_server.url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "tiny"}
    assert httpx.get(tiny_server.url + "/").headers["content-type"].startswith("text/html")
    assert httpx.get(tiny_server.url + "/v1/models").json()["error"]["code"] == "invalid_api_key"
