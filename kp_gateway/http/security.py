"""What keeps a browser and the network from turning the HTTP port against its users: security
headers on every response, the same-origin rule for cookie-authenticated writes (CSRF), the
Host check when authentication is off (DNS rebinding), safe redirects after login, and an
access log that never shows a token.

Middlewares and helpers run on the event loop.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from kp_gateway.errors import CrossOriginError, HostNotAllowedError

# Pages load their scripts, styles and pictures from this origin only, fetch only from it,
# and may not be framed (clickjacking). Thumbnails are shown through blob: URLs.
_CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' data: blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
_ALWAYS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_HTML = {"Content-Security-Policy": _CONTENT_SECURITY_POLICY, "X-Frame-Options": "DENY"}
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Names a browser on this machine uses for a loopback-only gateway.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``Application.on_response_prepare``: nosniff and no-referrer on every response (errors
    and streamed files too); a CSP and no framing on HTML."""
    for name, value in _ALWAYS.items():
        response.headers.setdefault(name, value)
    if response.content_type == "text/html":
        for name, value in _HTML.items():
            response.headers.setdefault(name, value)


def check_same_origin(request: web.Request) -> None:
    """Refuse a state-changing browser request sent from another origin.

    Fetch Metadata first (every current browser sends ``Sec-Fetch-Site``): only
    ``same-origin`` and ``none`` (typed by the user) pass; ``same-site`` does not, because
    another port or a sibling subdomain is a different origin. Without it, an ``Origin``
    header must name this origin. A request with neither comes from no browser (curl, a
    script) and passes: CSRF needs a browser. Raises CrossOriginError (403).
    """
    if request.method not in UNSAFE_METHODS:
        return
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        if site not in ("same-origin", "none"):
            raise CrossOriginError(f"cross-site request refused (Sec-Fetch-Site: {site})")
        return
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise CrossOriginError(f"cross-origin request from {origin} refused")


def check_host(request: web.Request, allowed: frozenset[str]) -> None:
    """Refuse a Host header that names none of `allowed` (host names without port).

    With authentication off, a web page on any site could otherwise point its own DNS name at
    127.0.0.1 and read the API from the victim's browser. Raises HostNotAllowedError (403).
    """
    host = request.host
    name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if name.lower() not in allowed:
        raise HostNotAllowedError(
            f"host {name!r} is not served here; with http.auth off only "
            f"{', '.join(sorted(allowed))} are (set http.public_host for another name)"
        )


def safe_redirect_target(target: str) -> str:
    """`target` when it is a path on this origin, else ``/``.

    Browsers ignore tabs and newlines in URLs and read a backslash as a slash, so
    ``/%09/evil.example`` or ``/\\evil.example`` would leave the origin.
    """
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


class RedactingAccessLogger(AbstractAccessLogger):
    """The access log, with the value of any ``token`` query parameter replaced by ``***``."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        url = request.rel_url
        if "token" in url.query:
            url = url.update_query(token="***")
        version = f"{request.version.major}.{request.version.minor}"
        self.logger.info(
            '%s "%s %s HTTP/%s" %d %d %.3fs',
            request.remote or "-",
            request.method,
            url,
            version,
            response.status,
            response.body_length,
            time,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


__all__ = [
    "LOOPBACK_HOSTS",
    "RedactingAccessLogger",
    "add_security_headers",
    "check_host",
    "check_same_origin",
    "safe_redirect_target",
]
