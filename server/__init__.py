"""Aetheris server: the OpenAI-compatible API (api/) on top of the continuous-batching engine (engine/),
which exchange the plain dataclasses of engine_io.py; app.py, loading.py and settings.py put them together."""
