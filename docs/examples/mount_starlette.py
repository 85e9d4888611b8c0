"""Mount the batchtrack ASGI app in Starlette (FastAPI's ``app.mount`` is the same)."""

from __future__ import annotations

from pathlib import Path

from service import parts
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import batchtrack.asgi


def create(data_dir: Path) -> Starlette:
    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("my app")

    return Starlette(
        routes=[
            Route("/", home),
            # The API is then at /batch/api/...: /batch/api/upload, /batch/api/batch-status/...
            Mount("/batch", app=batchtrack.asgi.create_app(*parts(data_dir))),
        ]
    )
