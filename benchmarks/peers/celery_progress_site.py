"""A minimal Django project serving celery-progress's ``get_progress`` view: the status
poll of a Celery task in the Redis result backend, as a Django + Celery site does it.

Settings are made in code (no project folder); the one URL is
``/celery-progress/<task_id>/``. :func:`application` builds the site for a WSGI server
(``gunicorn``): a Celery app on ``BENCH_REDIS_URL`` as the default app (the view asks
``AsyncResult`` of the current app), one task id stored in state ``PROGRESS`` with the
meta celery-progress's ``ProgressRecorder`` writes (4 of 10 done), and that task's URL
written to ``BENCH_DIR/info.json`` as ``bench_serve`` expects.

Needs ``pip install celery-progress django gunicorn`` (and ``redis``, which Celery's
Redis backend uses); ``bench_serve`` skips this peer, saying so, when they are missing.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

TASK_ID = str(uuid.UUID(int=0x1234, version=4))
urlpatterns: list[Any] = []


def application() -> Any:
    """The WSGI application: the Django site with the task's progress stored."""
    import django
    from celery import Celery
    from django.conf import settings

    url = os.environ["BENCH_REDIS_URL"]
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="bench-only-" + "x" * 40,
            ALLOWED_HOSTS=["127.0.0.1", "localhost"],
            ROOT_URLCONF=__name__,
            INSTALLED_APPS=["celery_progress"],
            MIDDLEWARE=[],
            USE_TZ=True,
        )
        django.setup()
    from celery_progress.views import get_progress
    from django.core.wsgi import get_wsgi_application
    from django.urls import path

    celery = Celery("peer", broker=url, backend=url)
    celery.set_default()
    celery.set_current()
    meta = {"pending": False, "current": 4, "total": 10, "percent": 40.0, "description": ""}
    celery.backend.store_result(TASK_ID, meta, "PROGRESS")
    urlpatterns[:] = [path("celery-progress/<str:task_id>/", get_progress)]
    wsgi = get_wsgi_application()

    folder = Path(os.environ.get("BENCH_DIR", "/tmp/bench-serve"))
    folder.mkdir(parents=True, exist_ok=True)
    info = {"path": f"/celery-progress/{TASK_ID}/", "etag": None, "app": "peer"}
    (folder / "info.json.part").write_text(json.dumps(info))
    os.replace(folder / "info.json.part", folder / "info.json")
    return wsgi
