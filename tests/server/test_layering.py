"""The layering the tree shows holds: the engine (server/engine/, server/engine_io.py) and the model (model/)
never import the HTTP side (server.api, FastAPI, pydantic, Starlette), and model/ imports nothing of the server.

Checked twice: statically, every import statement of every file (named with its line when it breaks the
rule), and in a fresh interpreter, that importing every engine and model module loads none of those packages
(an indirect import through a third-party package counts too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTTP = ("fastapi", "pydantic", "pydantic_settings", "starlette", "sse_starlette", "uvicorn")
FIRST_PARTY = ("server", "model", "training", "aetheris", "bench")
# What each layer may import of our own packages.
ALLOWED = {
    "server.engine": ("server.engine", "server.engine_io", "model"),
    "model": ("model",),
}


def _files(layer: str) -> list[Path]:
    folder = ROOT / layer.replace(".", "/")
    files = sorted(folder.rglob("*.py"))
    return files + ([ROOT / "server" / "engine_io.py"] if layer == "server.engine" else [])


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}" if not node.module else base) for a in node.names]
    return out


def violations(layer: str) -> list[str]:
    allowed = ALLOWED[layer]
    bad = []
    for path in _files(layer):
        for line, name in imports(path):
            top = name.split(".")[0]
            own = top in FIRST_PARTY and not any(name == a or name.startswith(a + ".") for a in allowed)
            if top in HTTP or own:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_layer_imports_only_what_it_may(layer):
    assert _files(layer), layer
    assert violations(layer) == []


def test_the_walk_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself: a file that imports the API through a relative import is caught, with its line."""
    fake = tmp_path / "server" / "engine"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("import torch\n\nfrom ..api.serving import Serving\n")
    (fake.parent / "engine_io.py").write_text("from pydantic import BaseModel\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("server.engine") == [
        "server/engine/bad.py:3 imports server.api.serving",
        "server/engine_io.py:1 imports pydantic",
    ]


def test_engine_and_model_load_no_http_package():
    modules = [_module(p) for layer in ALLOWED for p in _files(layer)]
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(n for n in sys.modules if n.split('.')[0] in {HTTP!r} or n.startswith('server.api')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert len(modules) > 30 and out.strip() == "[]", out
