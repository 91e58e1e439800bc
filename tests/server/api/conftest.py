"""The app in-process (no model, no engine): create_app around a stand-in for the loaded model, driven by
Starlette's TestClient. Enough for everything that happens before a route asks the engine for tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings


def fake_serving(name: str = "tiny") -> SimpleNamespace:
    engine = SimpleNamespace(metrics=None, alive=True, stalled=lambda seconds: False)
    return SimpleNamespace(engine=engine, model_name=name, max_model_len=None)


@pytest.fixture
def app_client():
    """app_client(**settings): a TestClient on create_app(Settings(**settings)) serving the stand-in."""

    def make(**settings) -> TestClient:
        return TestClient(create_app(Settings(**settings), fake_serving()))

    return make
