"""Start a real `python -m server` process on a free port and wait until /health says it is ready (the
integration tests and the HTTP benchmark use it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path | None, *args: str, env: dict | None = None, timeout: float = 60) -> None:
        """Flags in `args` go to `python -m server`; compiling (the server's default) is off unless `--compile`
        is among them, since a compile takes longer than most tests."""
        if "--compile" not in args:
            args = (*args, "--no-compile")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model = ["--model", str(model_dir)] if model_dir is not None else []  # None: the embedded default
        cmd = [
            sys.executable,
            "-m",
            "server",
            *model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            "1",
            *args,
        ]
        self.log = open(ROOT / f".server-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return
                if r.json()["error"]["code"] == "model_failed":
                    raise RuntimeError(f"the server could not load its model: {self.output()}")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        stop_process(self.proc, self.log)


def stop_process(proc: subprocess.Popen, log) -> None:
    """Terminate (kill after 10 s) a server process and remove its log file."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    Path(log.name).unlink(missing_ok=True)
