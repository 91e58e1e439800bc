"""A private Docker engine for the build-and-serve tests, and stand-ins for the two images' bases.

These machines reach PyPI and Debian's mirror but no image registry, so the
tests make the base images themselves: a debootstrapped Debian with Python, the host's CA bundle trusted inside
(TLS is intercepted here), imported under the name `python:3.11-slim`, and a variant of it imported as the
CUDA image's base. Torch comes from a tiny local
package index (the local CPU wheel and its dependencies) passed through the Dockerfile's TORCH_INDEX_URL
build argument; the Dockerfile itself is built unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


class CommandFailed(subprocess.SubprocessError):
    pass


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=kw.pop("text", True), timeout=timeout, **kw)
    if r.returncode != 0:
        out = r.stdout if isinstance(r.stdout, str) else r.stdout.decode(errors="replace")
        err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors="replace")
        raise CommandFailed(f"{' '.join(cmd[:4])} failed ({r.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    return r


def debian_mirror() -> tuple[str, str]:
    """(mirror URL, suite) from the machine's apt sources (deb822 or one-line format)."""
    texts = [
        p.read_text()
        for p in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
        if p.is_file() and p.suffix in (".list", ".sources", "")
    ]
    for text in texts:
        for block in text.split("\n\n"):
            uri = re.search(r"^URIs:\s*(\S+)", block, re.M)
            suite = re.search(r"^Suites:\s*(\S+)", block, re.M)
            if uri and suite and uri[1].rstrip("/").endswith("/debian"):
                return uri[1], suite[1]
        for line in text.splitlines():
            m = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+(\S+)\s", line)
            if m:
                return m[1], m[2]
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list*")


class DockerEngine:
    """dockerd on its own socket and data root; overlay2, falling back to vfs."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.sock = work / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen | None = None
        self.driver = None

    def docker(self, *args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        env = {**os.environ, "DOCKER_BUILDKIT": "0", "DOCKER_HOST": self.host}
        return run(["docker", *args], timeout=timeout, env=env, **kw)

    def start(self) -> None:
        for driver in ("overlay2", "vfs"):
            self._cleanup_dirs()
            log = open(self.work / f"dockerd-{driver}.log", "w")  # noqa: SIM115
            self.proc = subprocess.Popen(
                [
                    "dockerd",
                    "--storage-driver",
                    driver,
                    "--data-root",
                    str(self.work / "data"),
                    "--exec-root",
                    str(self.work / "exec"),
                    "-p",
                    str(self.work / "dockerd.pid"),
                    "-H",
                    self.host,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            deadline = time.time() + 30
            while time.time() < deadline and self.proc.poll() is None:
                try:
                    info = self.docker("info", "--format", "{{.Driver}}", timeout=10).stdout.strip()
                    if info == driver:
                        self.driver = driver
                        return
                except subprocess.SubprocessError:
                    pass
                time.sleep(0.5)
            self.stop()
        raise RuntimeError(f"dockerd did not start: {(self.work / 'dockerd-vfs.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        subprocess.run(["umount", str(self.work / "exec" / "netns" / "default")], capture_output=True)
        self._cleanup_dirs()

    def _cleanup_dirs(self) -> None:
        for d in ("data", "exec"):
            path = self.work / d
            if path.exists():
                subprocess.run(["umount", "-R", str(path)], capture_output=True)
                shutil.rmtree(path, ignore_errors=True)


def _rootfs(cache: Path) -> Path:
    """A debootstrapped Debian with Python 3, its headers, pip and venv (cached between runs; the CA bundle
    copied in is always the current host's)."""
    rootfs = cache / "rootfs-dev"  # named for its package set: a cache made with another set is not reused
    if not (rootfs / ".complete").exists():
        mirror, suite = debian_mirror()
        shutil.rmtree(rootfs, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        run(
            [
                "debootstrap",
                "--variant=minbase",
                # python3-dev: the official image has Python's headers, which torch.compile's C++ kernels include
                "--include=python3,python3-dev,python3-pip,python3-venv,python-is-python3,ca-certificates",
                suite,
                str(rootfs),
                mirror,
            ],
            timeout=900,
        )
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()  # the official image lets pip install globally
        (rootfs / ".complete").touch()
    shutil.copy(HOST_CA, rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    return rootfs


def _import(engine: DockerEngine, rootfs: Path, name: str) -> None:
    env = {**os.environ, "DOCKER_HOST": engine.host}
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--exclude", "./.complete", "-c", "."], stdout=subprocess.PIPE)
    imp = subprocess.run(
        ["docker", "import", "-", name], stdin=tar.stdout, capture_output=True, text=True, env=env, timeout=600
    )
    tar.stdout.close()
    if tar.wait() != 0 or imp.returncode != 0:
        raise CommandFailed(f"docker import failed: {imp.stdout}{imp.stderr}")


def stand_in_python_image(engine: DockerEngine, cache: Path) -> None:
    """Import the debootstrapped Debian with Python 3 and pip as `python:3.11-slim`."""
    _import(engine, _rootfs(cache), "python:3.11-slim")


CUDA_BASE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"


def stand_in_cuda_image(engine: DockerEngine, cache: Path, work: Path) -> None:
    """Import, as Dockerfile-nvidia's base, what matters of it without CUDA: like Ubuntu 24.04 it has a user
    `ubuntu` with uid 1000, and Python without its development headers."""
    rootfs = work / "cuda-rootfs"
    run(["cp", "-a", str(_rootfs(cache)), str(rootfs)], timeout=600)
    dev = ["python3-dev", "python3.11-dev", "libpython3-dev", "libpython3.11-dev"]
    run(["chroot", str(rootfs), "dpkg", "--purge", "--force-depends", *dev])
    run(["chroot", str(rootfs), "useradd", "--create-home", "--uid", "1000", "ubuntu"])
    assert not list(rootfs.glob("usr/include/python3*/Python.h"))
    try:
        _import(engine, rootfs, CUDA_BASE)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def local_torch_index(directory: Path) -> Path:
    """A PEP 503 index holding torch==2.13.0 (this machine's CPU wheel) and its dependencies."""
    wheels = directory / "wheels"
    run([sys.executable, "-m", "pip", "download", "-q", "torch==2.13.0", "-d", str(wheels)], timeout=900)
    simple = directory / "simple"
    for wheel in wheels.iterdir():
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        (simple / project).mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, simple / project / wheel.name)
    for project_dir in simple.iterdir():
        links = "".join(f'<a href="{f.name}">{f.name}</a>\n' for f in project_dir.iterdir() if f.name != "index.html")
        (project_dir / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    return simple
