"""The OpenAI-compatible server, tested as users use it: a real process, the official SDK, httpx, curl-shaped
raw requests. Expected texts come from a plain greedy loop over the model (tests/helpers.py::greedy)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import openai
import pytest
import torch

from aetheris.serverproc import ServerProcess
from model.checkpoint import load_model
from tests.helpers import greedy as greedy_loop
from tests.helpers import make_tiny_checkpoint

MODEL = "tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL)


@pytest.fixture(scope="module")
def server(ckpt):
    # --max-tokens-limit: the disconnect tests ask for far more tokens than the default cap allows.
    s = ServerProcess(ckpt, "--max-batch-size", "24", "--prefill-budget", "16", "--max-tokens-limit", "200000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(ckpt):
    model, tok = load_model(ckpt)
    return model, tok


def greedy(reference, prompt_ids: list[int], max_tokens: int) -> str:
    return greedy_loop(*reference, prompt_ids, max_tokens)


def chat_ids(reference, messages) -> list[int]:
    return reference[1].encode_chat(messages)


def test_chat_non_streaming_matches_reference(client, reference):
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy(reference, chat_ids(reference, messages), 12)
    assert r.usage.prompt_tokens == len(chat_ids(reference, messages))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_protocol(client, reference):
    messages = [{"role": "user", "content": "Stream please."}]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(reference, chat_ids(reference, messages), 10)


def test_raw_sse_framing_and_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") or e.startswith(":") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1] if e.startswith("data: {"))


def test_n2_seed_and_stop(client, reference):
    messages = [{"role": "user", "content": "Two please."}]
    kw = dict(
        model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=7, n=2, extra_body={"ignore_eos": True}
    )
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 16
    # A stop string taken from the middle of the greedy text: the reply ends just before it.
    full = greedy(reference, chat_ids(reference, messages), 16)
    stop = full[5:8]
    cut = full.find(stop)
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=[stop, "\u2603never"]
    )
    assert r.choices[0].message.content == full[:cut] and r.choices[0].finish_reason == "stop"


def test_stop_string_never_streamed(client, reference):
    messages = [{"role": "user", "content": "Stop me."}]
    full = greedy(reference, chat_ids(reference, messages), 20)
    stop = full[6:10]
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stop=stop, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full[: full.find(stop)] and stop not in text


def test_logprobs_equal_a_forward_pass(client, reference):
    """Each reported logprob and top-3 equals the log-softmax of one forward pass over prompt + reply."""
    model, tok = reference
    messages = [{"role": "user", "content": "lp"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    prompt = chat_ids(reference, messages)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):  # greedy by full forward passes, no recurrent state
            ids.append(int(model(torch.tensor([ids])).logits[0, -1, : tok.vocab_size].argmax()))
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1, : tok.vocab_size], -1)
    top = lp.topk(3, dim=-1)
    assert [c.token for c in content] == [tok.decode([t], skip_special_tokens=False) for t in ids[len(prompt) :]]
    for i, c in enumerate(content):
        assert abs(c.logprob - lp[i, ids[len(prompt) + i]].item()) < 1e-4
        assert [t.token for t in c.top_logprobs] == [
            tok.decode([j], skip_special_tokens=False) for j in top.indices[i].tolist()
        ]
        assert max(abs(t.logprob - v) for t, v in zip(c.top_logprobs, top.values[i].tolist())) < 1e-4


def test_completions_and_scoring(client, reference):
    model, tok = reference
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == greedy(reference, tok.encode("Once upon a time"), 6)
    # echo + logprobs + max_tokens 0 scores the prompt: compare with the model's own log-softmax.
    text = "The cat sat on the mat."
    s = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = s.choices[0].logprobs
    ids = tok.encode(text)
    assert s.choices[0].text == text and lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1, : tok.vocab_size], -1)
    want = want.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want.tolist())) < 1e-4
    # Several prompts, token-id prompts, n: one choice per prompt x n.
    m = client.completions.create(model=MODEL, prompt=[ids[:3], ids[3:5]], max_tokens=2, n=2, temperature=0)
    assert sorted(c.index for c in m.choices) == [0, 1, 2, 3]
    assert m.choices[0].text == greedy(reference, ids[:3], 2) and m.usage.prompt_tokens == 5
    m = client.completions.create(model=MODEL, prompt=["Hello", "World"], max_tokens=2, temperature=0)
    assert [c.text for c in sorted(m.choices, key=lambda c: c.index)] == [
        greedy(reference, tok.encode(p), 2) for p in ("Hello", "World")
    ]


def test_concurrent_greedy_equals_alone(server, reference):
    prompts = [[{"role": "user", "content": f"Story number {i}: " + "once " * (i % 5)}] for i in range(16)]
    lengths = [4 + (i * 3) % 13 for i in range(16)]

    async def one(c, messages, n):
        r = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0)
        return r.choices[0].message.content

    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(c, m, n) for m, n in zip(prompts, lengths)))

    got = asyncio.run(run())
    assert got == [greedy(reference, chat_ids(reference, m), n) for m, n in zip(prompts, lengths)]


def test_second_turn_uses_cached_state(client, reference):
    turn1 = [{"role": "user", "content": "A fresh conversation about a fox."}]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=10, temperature=0)
    turn2 = turn1 + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=10, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(chat_ids(reference, turn1)) and cached < r2.usage.prompt_tokens
    assert r2.choices[0].message.content == greedy(reference, chat_ids(reference, turn2), 10)


def _wait_idle(server, timeout=10.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = server.metrics()
        if m["aetheris_slots_used"] == 0 and m["aetheris_requests_running"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"slots still in use: {server.metrics()['aetheris_slots_used']}")


def test_disconnect_frees_slot(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go on forever"}],
        "max_tokens": 5000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept referenced: dropping the iterator would close the response
        for _ in range(7):
            next(lines)
        assert server.metrics()["aetheris_slots_used"] == 1
    _wait_idle(server)


def test_non_streaming_disconnect_frees_slot(server):
    """A non-streaming request whose client gives up is aborted: 200,000 tokens would take minutes on any
    machine, so a free slot 2 s after the client's 1 s timeout means the server saw it leave."""
    _wait_idle(server)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go on forever"}],
        "max_tokens": 200_000,
        "ignore_eos": True,
    }
    before = server.metrics()["aetheris_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    time.sleep(2.0)
    m = server.metrics()
    assert m["aetheris_generation_tokens_total"] > before  # it was decoding when the client left
    assert m["aetheris_slots_used"] == 0 and m["aetheris_requests_running"] == 0


BAD_BODIES = [
    (b"{not json", 400),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": []}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400),
    (
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}
        ).encode(),
        400,
    ),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}).encode(), 400),
    (
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999": 1}}
        ).encode(),
        400,
    ),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).encode(), 404),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": 2**64}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 25}).encode(), 400),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": "s" * 300}).encode(), 400),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"a" * (9 << 20) + b'"}]}', 413),
]


@pytest.mark.parametrize("raw,status", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_requests_get_openai_errors(server, client, raw, status):
    r = httpx.post(
        server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] is None or isinstance(err["code"], str)
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=0)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_models_tokenize_health_metrics(server, client, reference):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    assert ids == reference[1].encode("Hello there")
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello there"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    m = server.metrics()
    assert m["aetheris_slots_total"] == 24 and m["aetheris_generation_tokens_total"] > 0
    assert any(k.startswith("aetheris_expert_tokens_total{") for k in m)
    assert m["aetheris_state_cache_hits_total"] >= 1


@pytest.fixture(scope="module")
def small_server(ckpt):
    s = ServerProcess(
        ckpt,
        *("--max-batch-size", "2", "--max-queue", "1", "--api-key", "sekret", "--cors-origins", "http://example.com"),
        *("--max-tokens-limit", "100000"),
    )
    yield s
    s.stop()


def test_queue_full_answers_503_then_recovers(small_server):
    s = small_server
    headers = {"Authorization": "Bearer sekret"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 100000,
        "ignore_eos": True,
        "stream": True,
    }

    async def run():
        async with httpx.AsyncClient(base_url=s.url, headers=headers, timeout=30) as c:
            holders = []
            for _ in range(3):  # two take the slots, one waits
                cm = c.stream("POST", "/v1/chat/completions", json=body)
                r = await cm.__aenter__()
                assert r.status_code == 200
                holders.append(cm)
            deadline = time.time() + 10
            while s.metrics()["aetheris_requests_waiting"] < 1 and time.time() < deadline:
                await asyncio.sleep(0.05)
            over = await c.post("/v1/chat/completions", json={**body, "stream": False})
            assert over.status_code == 503 and over.headers["retry-after"] == "1"
            assert over.json()["error"]["code"] == "server_overloaded"
            for cm in holders:
                await cm.__aexit__(None, None, None)

    asyncio.run(run())
    _wait_idle(s)
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
    assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2).choices


def test_auth_and_cors(small_server):
    s = small_server
    r = httpx.post(
        s.url + "/v1/chat/completions", json={"model": MODEL, "messages": []}, headers={"Authorization": "Bearer wrong"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(s.url + "/health").status_code == 200
    pre = httpx.options(
        s.url + "/v1/chat/completions",
        headers={
            "Origin": "http://example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.com"


def test_completions_streaming_with_echo_and_usage(client, reference):
    model, tok = reference
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            echo=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "Once upon a time" + greedy(reference, tok.encode("Once upon a time"), 8)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def _outputs(client, tok, **kw) -> list[list[int]]:
    """Each choice's output token ids (from its logprobs' exact bytes) for a chat turn that ignores EOS."""
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], logprobs=True, extra_body={"ignore_eos": True},
        **kw,
    )  # fmt: skip
    ids = {tok.token_bytes(t): t for t in range(tok.vocab_size)}
    return [[ids[bytes(lp.bytes)] for lp in c.logprobs.content] for c in r.choices]


def _most_repeated(tokens: list[int]) -> tuple[int, int]:
    return Counter(tokens).most_common(1)[0]


def test_logit_bias_raises_a_token_and_minus_100_forbids_it(client, reference):
    tok = reference[1]
    cat = tok.encode(" cat")[0]
    assert _outputs(client, tok, max_tokens=5, temperature=0, logit_bias={str(cat): 100}) == [[cat] * 5]
    sampled = dict(max_tokens=16, temperature=1.0, n=4, seed=1)
    plain = sum(o.count(cat) for o in _outputs(client, tok, **sampled))
    raised = sum(o.count(cat) for o in _outputs(client, tok, **sampled, logit_bias={str(cat): 5}))
    assert raised >= 10 and raised > 3 * plain  # e^5 times as likely: from about 1 in 300 to about 1 in 3
    top, _ = _most_repeated(_outputs(client, tok, max_tokens=20, temperature=0)[0])
    for kw in (dict(max_tokens=20, temperature=0), sampled):
        assert all(top not in o for o in _outputs(client, tok, **kw, logit_bias={str(top): -100}))


def test_presence_and_frequency_penalties_reduce_repetition(client, reference):
    """A tiny random model's greedy text repeats a token; a positive penalty makes it repeat less, a negative
    one (a reward) no less."""
    repeats = lambda **kw: _most_repeated(_outputs(client, reference[1], max_tokens=20, temperature=0, **kw)[0])[1]  # noqa: E731
    plain = repeats()
    assert plain > 4
    for penalty in ("presence_penalty", "frequency_penalty"):
        assert repeats(**{penalty: 2.0}) < plain <= repeats(**{penalty: -2.0})


def test_extreme_but_valid_values_do_not_disturb_others(server):
    """A greedy request's text alone equals its text when it shares decode batches with extreme samplers."""
    messages = [{"role": "user", "content": "A calm request."}]
    extreme = dict(
        messages=[{"role": "user", "content": "x"}],
        max_tokens=12,
        seed=2**64 - 1,
        top_p=0.5,
        temperature=1.5,
        presence_penalty=2.0,
        frequency_penalty=-2.0,
        logit_bias={"5": 100, "6": -100},
        extra_body={"top_k": 2**62, "ignore_eos": True},
    )

    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        calm = lambda: c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        alone = await calm()
        amid = await asyncio.gather(calm(), *(c.chat.completions.create(model=MODEL, **extreme) for _ in range(4)))
        return alone, amid

    alone, amid = asyncio.run(run())
    assert amid[0].choices[0].message.content == alone.choices[0].message.content
    assert all(r.usage.completion_tokens == 12 for r in amid[1:])


def test_streamed_oversized_body_gets_413(server):
    def chunks():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"a" * (1 << 20)
        yield b'"}]}'

    r = httpx.post(
        server.url + "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_n_larger_than_the_pool_is_refused(small_server):
    r = httpx.post(
        small_server.url + "/v1/chat/completions",
        headers={"Authorization": "Bearer sekret"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3, "max_tokens": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
