"""Aetheris server: the continuous-batching engine (core, engine, state_pool, sequence; no FastAPI) and the
OpenAI-compatible API on top of it (app, protocol, chat, completions, streaming)."""
