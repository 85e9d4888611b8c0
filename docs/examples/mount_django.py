"""Serve batchtrack beside a Django project, over ASGI (asgi.py) or WSGI (wsgi.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import django
from django.conf import settings
from service import parts

import batchtrack.asgi
import batchtrack.wsgi


def _configure() -> None:
    # In a real project this is your settings module; it is inline to keep the example whole.
    if not settings.configured:
        settings.configure(
            ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], SECRET_KEY="example", DEBUG=False
        )
        django.setup()


def home(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse("my app")


urlpatterns: list[Any] = []


def create_asgi(data_dir: Path) -> Any:
    """asgi.py: paths under /batch go to batchtrack, the rest to Django."""
    _configure()
    from django.core.asgi import get_asgi_application
    from django.urls import path

    urlpatterns[:] = [path("", home)]
    django_app = get_asgi_application()
    batch_app = batchtrack.asgi.create_app(*parts(data_dir))

    async def application(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].startswith("/batch/"):
            scope = {**scope, "root_path": scope.get("root_path", "") + "/batch"}
            await batch_app(scope, receive, send)
        else:
            await django_app(scope, receive, send)

    return application


def create_wsgi(data_dir: Path) -> Any:
    """wsgi.py: the same split for WSGI servers (gunicorn, mod_wsgi)."""
    _configure()
    from django.core.wsgi import get_wsgi_application
    from django.urls import path

    urlpatterns[:] = [path("", home)]
    django_app = get_wsgi_application()
    batch_app = batchtrack.wsgi.create_app(*parts(data_dir))

    def application(environ: dict[str, Any], start_response: Any) -> Any:
        path_info = environ.get("PATH_INFO", "")
        if path_info.startswith("/batch/"):
            environ = {
                **environ,
                "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + "/batch",
                "PATH_INFO": path_info[len("/batch") :],
            }
            return batch_app(environ, start_response)
        return django_app(environ, start_response)

    return application
