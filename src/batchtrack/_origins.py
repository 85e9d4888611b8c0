"""Which pages may change state with a session cookie: refusing other sites' requests.

A session cookie goes with every request a browser sends to the app, whichever page sent
it. :func:`check_origin` refuses the state-changing ones that another site's page sent
(cross-site request forgery), from what the browser says about them.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from ._wire import Request, reject
from .exceptions import ValidationError

__all__ = ["check_origin", "parse_trusted_origins"]

_DEFAULT_PORTS = {"http": ":80", "https": ":443"}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_OTHER_SITES = frozenset({"same-site", "cross-site"})
"""``Sec-Fetch-Site`` values of a request sent by another origin's page."""


def parse_trusted_origins(value: Iterable[str] | None) -> frozenset[str]:
    """The ``trusted_origins`` option: ``scheme://host[:port]`` each, in lower case.

    Raises:
        ValidationError: A string alone (not a list of them), or an entry that is not an
            origin (a path, no scheme, ...).
    """
    if value is None:
        return frozenset()
    if isinstance(value, (str, bytes)):
        raise ValidationError("trusted_origins must be a list of origins, not one string")
    origins = set()
    for origin in value:
        parts = urlsplit(origin) if isinstance(origin, str) else None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.netloc
            or origin.rstrip("/") != f"{parts.scheme}://{parts.netloc}"
        ):
            raise ValidationError(
                f"trusted_origins: {origin!r} is not an origin such as 'https://example.com'"
            )
        origins.add(_origin(parts.scheme, parts.netloc))
    return frozenset(origins)


def check_origin(request: Request, trusted: frozenset[str]) -> None:
    """Refuse a state-changing request that another site's page sent: 403 ``cross_origin``.

    The browser's ``Sec-Fetch-Site`` decides when it is there (``same-site`` is refused
    too: a sibling subdomain is another origin, and ``SameSite=Lax`` lets the cookie go
    with it); else ``Origin`` must be the request's own scheme and host. A request with
    neither (curl, a server-side client) is no browser's, and passes; so does one from an
    origin in ``trusted``, and every GET, HEAD and OPTIONS.

    Raises:
        Reject: 403 ``cross_origin``.
    """
    if request.method in _SAFE_METHODS:
        return
    headers = request.headers
    origin = headers.get("origin")
    if origin is not None and origin != "null":
        parts = urlsplit(origin)
        origin = _origin(parts.scheme, parts.netloc)
        if origin in trusted:
            return
    site = headers.get("sec-fetch-site", "").strip().lower()
    if site:
        if site not in _OTHER_SITES:
            return
    elif origin is None or origin == _origin(request.scheme, headers.get("host", "")):
        return
    reject(
        403,
        "cross_origin",
        f"a page of another site ({(origin or site)[:100]}) may not send this request; "
        f"send it from this site's own pages",
    )


def _origin(scheme: str, host: str) -> str:
    """``scheme://host[:port]`` in lower case, without the scheme's default port."""
    scheme, host = scheme.lower(), host.lower()
    host = host.removesuffix(_DEFAULT_PORTS.get(scheme, ""))
    return f"{scheme}://{host}"
