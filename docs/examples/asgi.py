"""FastAPI or Starlette: ``uvicorn asgi:app`` in this folder serves / and the API under /batch."""

from pathlib import Path

from mount_starlette import create

app = create(Path("batchtrack-data"))
