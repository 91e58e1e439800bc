"""The servers as users run them: ours (`python -m server`, its defaults) and llama-cpp-python's OpenAI server
(`python -m llama_cpp.server`) on the same weights (safetensors for ours, the GGUF converted from them for
it), through HTTP with 1, 8 and 32 concurrent streaming clients: tokens/s and time to first token. The peer
needs `pip install "llama-cpp-python[server]"` (its server's extra dependencies)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from aetheris.serverproc import ROOT, ServerProcess, free_port, stop_process
from bench import http_load


class LlamaCppServer:
    """`python -m llama_cpp.server` on a free port, 2 threads, the model served as 'bench'."""

    def __init__(self, gguf: Path, timeout: float = 300) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "bench"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--n_threads", "2", "--n_ctx", "4096"]
        cmd += ["--interrupt_requests", "False"]  # queue concurrent requests (its default cuts a stream off)
        self.log = open(ROOT / f".llama-server-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"llama_cpp.server exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("llama_cpp.server did not start")

    def stop(self) -> None:
        stop_process(self.proc, self.log)


def compare(hf_dir: Path, gguf: Path | None, clients=(1, 8, 32), tokens: int = 64) -> dict:
    """{server: {clients: stream_clients(...)}}; the servers run one after the other, never together."""
    out: dict = {}
    ours = ServerProcess(hf_dir, "--served-model-name", "bench", "--threads", "2", "--compile", timeout=600)
    try:
        http_load.stream_clients(ours.url, 1, 16)  # warm
        out["ours"] = {c: http_load.stream_clients(ours.url, c, tokens, ours.proc.pid) for c in clients}
    finally:
        ours.stop()
    if gguf is not None:
        peer = LlamaCppServer(gguf)
        try:
            http_load.stream_clients(peer.url, 1, 16)
            out["llama-cpp-python"] = {c: http_load.stream_clients(peer.url, c, tokens, peer.proc.pid) for c in clients}
        finally:
            peer.stop()
    return out
