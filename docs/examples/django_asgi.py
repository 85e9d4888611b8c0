"""Django: ``uvicorn django_asgi:app`` in this folder serves / and the API under /batch."""

from pathlib import Path

from mount_django import create_asgi

app = create_asgi(Path("batchtrack-data"))
