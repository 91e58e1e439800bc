"""The engine: scheduling, the model runner, sampling, the state pool and the prefix cache, in one thread.

No FastAPI and no pydantic here (tests/server/test_layering.py walks the imports): the API hands requests in
and takes outputs out as the plain dataclasses of server/engine_io.py.
"""
