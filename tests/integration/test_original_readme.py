"""The commands of the original Aetheris README (the project this one grew from), run as it writes them:
`python -m aetheris.cli.main train | generate | serve`, its curl to /v1/chat/completions, and `pytest tests/`.

Two liberties, each said where it is taken: the serve command gets a free port instead of 8000, and training
the paper-size default config is stopped once it has started its first step (it runs for hours)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from aetheris.serverproc import free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "aetheris.cli.main"]
CURL_BODY = {"model": "aetheris-hybrid", "messages": [{"role": "user", "content": "Hello! Tell me a story."}]}


def test_help_is_the_aetheris_command():
    r = subprocess.run([*CLI, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "{train,generate,serve,analyze-router}" in r.stdout
    same = subprocess.run([sys.executable, "-m", "aetheris.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert same.stdout == r.stdout and "RuntimeWarning" not in r.stderr


def test_generate_from_the_checkpoints_folder():
    """`--checkpoint_dir checkpoints` holds one checkpoint below it (the embedded model): that one loads."""
    cmd = [*CLI, "generate", "--prompt", "The quick brown fox", "--checkpoint_dir", "checkpoints"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) >= 5  # it wrote a continuation
    notes = [line for line in r.stderr.splitlines() if "holds no checkpoint itself" in line]
    assert notes == ["aetheris: checkpoints holds no checkpoint itself; loading checkpoints/aetheris-hybrid, the one "
                     "checkpoint below it"]  # fmt: skip


def test_serve_and_the_curl_of_that_readme(tmp_path):
    """The serve command on a free port instead of 8000 (compiling off through its environment variable, to keep
    the suite short; the compiled default is served in test_default_model.py), then the README's curl."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    env = {**os.environ, "AETHERIS_COMPILE": "false"}
    proc = subprocess.Popen([*CLI, "serve", "--host", "0.0.0.0", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_healthy(f"http://localhost:{port}", proc, log)
        curl = [
            "curl", "-s", f"http://localhost:{port}/v1/chat/completions", "-H", "Content-Type: application/json",
            "-d", json.dumps(CURL_BODY),
        ]  # fmt: skip
        r = subprocess.run(curl, capture_output=True, text=True, timeout=120, check=True)
        reply = json.loads(r.stdout)
        assert reply["model"] == "aetheris-hybrid" and reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["content"].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _wait_healthy(url: str, proc: subprocess.Popen, log, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.seek(0) or log.read()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(log.seek(0) or log.read())


def test_train_the_default_config_starts(tmp_path):
    """The paper-size config trains for hours on a CPU: the command as written must get as far as its first
    training step (config read, tokenizer trained, model built, config.yaml written into out_dir), then it is
    stopped. It runs in a scratch folder that sees the repository's configs/ and data/, so runs/ lands there."""
    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    proc = subprocess.Popen([*CLI, "train", "--config", "configs/default.yaml"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    started = tmp_path / "runs" / "moe-mamba-paper" / "config.yaml"
    try:
        deadline = time.time() + 600
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert started.exists(), proc.poll() is not None and proc.stdout.read()
        assert "preset: moe-mamba-paper" in started.read_text()
    finally:
        proc.kill()
        proc.wait()


def test_pytest_tests_collects_the_readme_suite():
    """`pytest tests/` from the repository root runs what `python -m pytest -q` (README's test command) runs."""
    ids = []
    pytest_script = str(Path(sys.executable).with_name("pytest"))  # the `pytest` a user runs, beside this Python
    for cmd in ([pytest_script, "tests/", "-q"], [sys.executable, "-m", "pytest", "-q"]):
        r = subprocess.run([*cmd, "--collect-only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:]
        ids.append(sorted(line for line in r.stdout.splitlines() if "::" in line))
    assert len(ids[0]) > 500 and ids[0] == ids[1]
