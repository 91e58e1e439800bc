"""GET /: the chat page (static/index.html), a single file with its script inline."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse

PAGE = Path(__file__).with_name("static") / "index.html"

page_router = APIRouter(include_in_schema=False)


@page_router.get("/")
async def index():
    if PAGE.exists():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))
    return JSONResponse({"message": "Aetheris is running; the API is under /v1"})
