"""The embedded default model: `python -m server` with no options serves it as aetheris-hybrid, and
`aetheris generate` writes text with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from aetheris.defaults import DEFAULT_MODEL_DIR as DEFAULT
from aetheris.serverproc import ServerProcess
from model import huge_pages
from model.checkpoint import load_model
from model.quantized import quantize_int8
from tests.helpers import greedy

ROOT = Path(__file__).resolve().parents[2]
STORY_PROMPT = [{"role": "user", "content": "Tell me a story about Lily."}]


@pytest.fixture(scope="module")
def default_model():
    return load_model(DEFAULT)


def test_checkpoint_is_small_and_documented():
    size = sum(f.stat().st_size for f in DEFAULT.iterdir())
    assert size <= 40 * 2**20
    card = (DEFAULT / "README.md").read_text()
    assert "aetheris train --config configs/aetheris-hybrid.yaml" in card and "CDLA-Sharing-1.0" in card
    model, tok = load_model(DEFAULT)
    assert len(model.moe_layers()) >= 1 and tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_generate_cli_writes_the_greedy_story(default_model):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "aetheris.cli",
            "generate",
            "--prompt",
            "Once upon a time",
            "--max_tokens",
            "40",
            "--temperature",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    model, tok = default_model
    assert r.stdout == greedy(model, tok, tok.encode("Once upon a time"), 40) + "\n"


def _story(*args: str, timeout: float = 60) -> tuple[str, str]:
    """A greedy chat answer from `python -m server *args` with no model option, and the server's log."""
    s = ServerProcess(None, *args, timeout=timeout)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["aetheris-hybrid"]
        r = client.chat.completions.create(
            model="aetheris-hybrid",
            max_tokens=60,
            temperature=0,
            messages=STORY_PROMPT,
        )
        return r.choices[0].message.content, s.output()
    finally:
        s.stop()


def test_server_defaults_to_the_embedded_model(default_model):
    story, _ = _story()
    model, tok = default_model
    assert story == greedy(model, tok, tok.encode_chat(STORY_PROMPT), 60)


def test_fast_paths_tell_the_same_story():
    """The default (the few-row kernel, weights in huge pages), packed, packed + compiled, and plain F.linear in
    4 KiB pages: the same greedy text end to end."""
    default, log = _story()
    assert "few-row kernel (bf16: " in log and "serves 13 Linear layers and the MoE experts" in log, log
    assert ("weights in transparent huge pages" in log) == huge_pages.available(), log
    packed, log = _story("--pack-weights")
    assert "packed 13 Linear layers" in log, log  # 3 per mixer x 4 + the head; MoE experts and routers stay
    compiled, log = _story("--pack-weights", "--compile", timeout=600)
    assert "compiled the decode step and the prefill scan" in log, log
    plain, log = _story("--no-pack-weights", "--no-huge-pages")
    assert "Linear layers left to F.linear (--no-pack-weights)" in log, log
    assert "huge pages" not in log, log
    assert compiled == packed == plain == default


def test_int8_server_serves_the_quantized_model():
    """--quantize int8: the server's greedy story is the in-process int8 model's, token for token."""
    story, log = _story("--quantize", "int8")
    assert "quantized 13 Linear layers and the MoE experts to int8" in log, log
    model, tok = load_model(DEFAULT)
    quantize_int8(model)
    assert story == greedy(model, tok, tok.encode_chat(STORY_PROMPT), 60)


def test_aetheris_serve_takes_the_server_options():
    r = subprocess.run(
        [sys.executable, "-m", "aetheris.cli", "serve", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0 and "--max-batch-size" in r.stdout and "AETHERIS_MODEL" in r.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "aetheris.cli", "serve", "--port", "x"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--port" in bad.stderr.strip().splitlines()[-1]
