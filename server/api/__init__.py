"""The HTTP side of the server: routes, request models, streaming, tools and structured-output requests.

It may import the engine (server/engine) and the plain dataclasses between them (server/engine_io.py); the
engine never imports it.
"""
