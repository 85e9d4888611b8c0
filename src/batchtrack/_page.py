"""The page of ``create_app(..., page=True)``: pick images, upload, follow the batch.

One self-contained HTML file (``static/index.html``: HTML, CSS and JavaScript, nothing
remote) served at the mount point's ``/`` (and ``/index.html``), and its icon at
``/favicon.ico``. The page is served with a small JSON configuration in it, so it learns
where the API is and the app's limits (files per batch, bytes per file) from the server
instead of repeating them.
"""

from __future__ import annotations

import html
import json
from importlib import resources

import attrs

from ._wire import Request, Response

__all__ = ["CONTENT_SECURITY_POLICY", "Page", "page_html"]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
)
"""Nothing but the page's own inline code and this app's URLs; never in a frame."""

_CONFIG_MARK = "{}<!--batchtrack-config-->"
_ROOT_MARK = "{{root}}"


def page_html() -> str:
    """The page as shipped in the package, with its two marks still in it."""
    return resources.files("batchtrack").joinpath("static/index.html").read_text("utf-8")


def _icon() -> bytes:
    return resources.files("batchtrack").joinpath("static/favicon.ico").read_bytes()


@attrs.define(eq=False)
class Page:
    """Serves the page and its icon for an app.

    Attributes:
        prefix: The API's prefix (the page calls ``<mount point><prefix>/...``).
        max_files: Files per batch, as the API enforces it.
        max_bytes: Bytes per file, as the upload store enforces it.
    """

    prefix: str
    max_files: int
    max_bytes: int
    _html: str = attrs.field(init=False, factory=page_html)
    _icon: bytes = attrs.field(init=False, factory=_icon)

    def route(self, path: str) -> str | None:
        """What ``path`` (below the mount point) asks for: ``"page"``, ``"icon"`` or None."""
        if path in ("", "/", "/index.html"):
            return "page"
        if path == "/favicon.ico":
            return "icon"
        return None

    def serve(self, request: Request, what: str) -> Response:
        """The page or the icon, for a GET or HEAD of a path :meth:`route` accepted."""
        if what == "icon":
            return Response(
                200,
                [
                    ("Content-Type", "image/x-icon"),
                    ("Content-Length", str(len(self._icon))),
                    ("Cache-Control", "public, max-age=86400"),
                ],
                self._icon,
            )
        config = {
            "api": f"{request.root_path}{self.prefix}",
            "maxFiles": self.max_files,
            "maxBytes": self.max_bytes,
        }
        # In a <script> element: "<" escaped, so the JSON can never close the element.
        text = json.dumps(config).replace("<", "\\u003c")
        page = self._html.replace(_CONFIG_MARK, text)
        body = page.replace(_ROOT_MARK, html.escape(request.root_path)).encode("utf-8")
        return Response(
            200,
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-cache"),
                ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
                ("X-Content-Type-Options", "nosniff"),
                ("Referrer-Policy", "same-origin"),
            ],
            body,
        )
