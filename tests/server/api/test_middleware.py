"""The API key gate in-process: with --api-key every route is closed except /health and / (and /metrics unless
--metrics-require-key); a refusal is the OpenAI error object; CORS preflights pass."""

from __future__ import annotations

import pytest

KEY = {"Authorization": "Bearer sekret"}
CLOSED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/tiny"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/nope"),
]


@pytest.mark.parametrize("method,path", CLOSED)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic sekret", "sekret"])
def test_every_route_but_the_open_ones_needs_the_key(app_client, method, path, auth):
    client = app_client(api_key="sekret")
    r = client.request(method, path, headers={"Authorization": auth} if auth else {}, json={})
    assert r.status_code == 401
    assert r.json() == {
        "error": {
            "message": "invalid or missing API key (send 'Authorization: Bearer <key>')",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_the_key_opens_the_closed_routes(app_client):
    client = app_client(api_key="sekret")
    assert client.get("/v1/models", headers=KEY).json()["data"][0]["id"] == "tiny"
    assert client.get("/openapi.json", headers=KEY).json()["info"]["title"] == "Aetheris"
    assert client.get("/docs", headers=KEY).status_code == 200
    nope = client.get("/v1/nope", headers=KEY)  # past the gate: the app's own 404
    assert nope.status_code == 404 and nope.json()["error"]["type"] == "not_found_error"


def test_health_page_and_metrics_stay_open(app_client):
    client = app_client(api_key="sekret")
    assert client.get("/health").json() == {"status": "ok", "model": "tiny"}
    assert client.get("/").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "aetheris_requests_running" in metrics.text


def test_metrics_require_key_closes_metrics_only(app_client):
    client = app_client(api_key="sekret", metrics_require_key=True)
    assert client.get("/metrics").json()["error"]["code"] == "invalid_api_key"
    assert "aetheris_requests_running" in client.get("/metrics", headers=KEY).text
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def test_without_a_key_nothing_is_closed(app_client):
    client = app_client()
    assert client.get("/v1/models").status_code == 200 and client.get("/openapi.json").status_code == 200


def test_options_passes_the_gate(app_client):
    """A preflight reaches the app without the key (no CORS here: the app's own 405, not the gate's 401)."""
    assert app_client(api_key="sekret").options("/v1/models").status_code == 405


def test_cors_preflight_passes_the_gate_and_a_refusal_carries_cors_headers(app_client):
    client = app_client(api_key="sekret", cors_origins=["http://example.com"])
    origin = {"Origin": "http://example.com"}
    pre = client.options(
        "/v1/chat/completions",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.com"
    refused = client.get("/v1/models", headers=origin)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://example.com"
