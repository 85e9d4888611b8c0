"""Mount the batchtrack WSGI app next to a Flask app."""

from __future__ import annotations

from pathlib import Path

from flask import Flask
from service import parts
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import batchtrack.wsgi


def create(data_dir: Path) -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def home() -> str:
        return "my app"

    # Requests under /batch go to batchtrack (SCRIPT_NAME=/batch), the rest to Flask.
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/batch": batchtrack.wsgi.create_app(*parts(data_dir))}
    )
    return app
