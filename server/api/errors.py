"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}, code a string or null."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine_io import EngineError, EngineOverloaded

log = logging.getLogger("aetheris.api")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"invalid JSON body: {err.get('msg')}", None, "invalid_json"
    if err.get("type") == "missing":
        return f"missing required parameter: {'.'.join(loc)}", ".".join(loc) or None, "missing_required_parameter"
    param = ".".join(loc) or None
    return f"{param or 'body'}: {err.get('msg')}", param, "invalid_value"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = None
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body is not valid UTF-8 JSON"
        elif exc.status_code == 413:
            code = "request_too_large"
        return error_response(exc.status_code, detail, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, exc: EngineOverloaded):
        return error_response(503, str(exc), code="server_overloaded", headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", code="internal_error")

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError):
        return error_response(500, str(exc), code="engine_error", headers={"x-should-retry": "false"})
