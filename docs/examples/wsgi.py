"""Flask: ``flask --app wsgi run`` in this folder serves / and the API under /batch."""

from pathlib import Path

from mount_flask import create

app = create(Path("batchtrack-data"))
