"""Authentication and access over HTTP: who a request is (the auth middleware), the login and
logout pages that make and end browser sessions, and the checks every handler asks before it
answers (:func:`require_admin`, :func:`require_read`, :func:`require_write`,
:func:`can_read_series`), which all defer to :class:`~kp_gateway.access.Principal`.

What a project token may not see does not exist for it: another project, its series, uploads
and files answer 404 exactly as if they were absent, so a token learns nothing of other
projects. What it may see but not do answers 403: a cross-project route (``admin_only``) or a
change through a read token (``read_only``).

Middleware and handlers run on the event loop.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable

from aiohttp import web
from yarl import URL

from kp_gateway.access import ADMIN, Principal
from kp_gateway.config import HttpConfig
from kp_gateway.errors import AdminOnlyError, ReadOnlyTokenError, UnknownProjectError
from kp_gateway.http.appkeys import HTTP_CONFIG_KEY, INDEX_KEY, TOKEN_KEY
from kp_gateway.http.responses import json_error
from kp_gateway.http.security import (
    LOOPBACK_HOSTS,
    UNSAFE_METHODS,
    check_host,
    check_same_origin,
    safe_redirect_target,
)
from kp_gateway.http.sessions import SessionStore
from kp_gateway.tokens import TokenStore

SESSION_COOKIE = "kp_gateway_session"
ALLOWED_HOSTS_KEY = web.AppKey("allowed_hosts", frozenset)
TOKENS_KEY = web.AppKey("tokens", TokenStore)
SESSIONS_KEY = web.AppKey("sessions", SessionStore)
PRINCIPAL_KEY = web.RequestKey("principal", Principal)
# DICOMweb (CONTRACT section 9): the root serves every series, so only the admin token; a
# project's root serves that project, to its tokens as well.
_DICOMWEB_ROOT = re.compile(r"/dicomweb(/|$)")
_PROJECT_DICOMWEB = re.compile(r"/projects/([^/]+)/dicomweb(/|$)")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed_hosts(cfg: HttpConfig) -> frozenset[str]:
    """Host names served when authentication is off: loopback, the bind address, the public
    host name."""
    names = set(LOOPBACK_HOSTS)
    names.update(h.lower() for h in (cfg.host, cfg.public_host) if h and h not in ("0.0.0.0", "::"))
    return frozenset(names)


# -- who the request is -------------------------------------------------------------------


def is_api_path(path: str) -> bool:
    """Routes for programs (the JSON API, DICOMweb): a 401, never a redirect to the login."""
    return (
        path.startswith("/api/")
        or _DICOMWEB_ROOT.match(path) is not None
        or _PROJECT_DICOMWEB.match(path) is not None
    )


def _is_cors_preflight(request: web.Request) -> bool:
    """A browser's CORS preflight: it never carries credentials and reads nothing; the CORS
    handler (only for ``dicomweb.cors_origins``) answers it."""
    return (
        request.method == "OPTIONS"
        and "Access-Control-Request-Method" in request.headers
        and is_api_path(request.path)
    )


def _is_public(path: str) -> bool:
    return path.startswith(("/health/", "/static/")) or path == "/metrics"


def _tokens_equal(offered: str, token: str) -> bool:
    # Bytes: compare_digest refuses str with non-ASCII characters (a 500 before).
    return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), token.encode())


def principal_for_token(app: web.Application, offered: str) -> Principal | None:
    """The principal a token stands for: the admin token, a live project token, or None."""
    if not offered:
        return None
    if _tokens_equal(offered, app[TOKEN_KEY]):
        return ADMIN
    token = app[TOKENS_KEY].verify(offered)
    return None if token is None else token.principal


def _principal_for_session(app: web.Application, session_id: str) -> Principal | None:
    sessions = app[SESSIONS_KEY]
    principal = sessions.get(session_id)
    token_id = principal.token_id if principal is not None else None
    if token_id is not None and not app[TOKENS_KEY].active(token_id):
        # Revoked or expired since the login: the session ends with its token.
        sessions.end(session_id)
        return None
    return principal


def set_session_cookie(request: web.Request, response: web.StreamResponse, session_id: str) -> None:
    """The session cookie: HttpOnly, SameSite=Strict, Secure when the page came over https."""
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/",
    )


def _check_path_scope(request: web.Request, principal: Principal) -> None:
    """Access by path where no handler names the project itself (DICOMweb)."""
    path = request.path
    if _DICOMWEB_ROOT.match(path):
        require_admin(request)
    elif match := _PROJECT_DICOMWEB.match(path):
        project = match.group(1).lower()
        if request.method in UNSAFE_METHODS:
            require_write(request, project)
        else:
            require_read(request, project)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Find the principal: bearer token, session cookie, or ``?token=``; the Host check when
    auth is off (then every request is the admin).

    On pages, ``?token=`` is traded once for a session (a redirect, as Jupyter does); on
    ``/api/`` routes it answers the request itself, since a script wants the data, not a
    redirect and a cookie. A write authenticated by the cookie must come from this origin
    (:func:`~kp_gateway.http.security.check_same_origin`), and so must login and logout.
    Without valid credentials: 401 JSON for programs (``/api/``, DICOMweb), else a redirect
    to the login page.
    """
    app = request.app
    if not app[HTTP_CONFIG_KEY].auth:
        check_host(request, app[ALLOWED_HOSTS_KEY])
        request[PRINCIPAL_KEY] = ADMIN
        _check_path_scope(request, ADMIN)
        return await handler(request)
    if _is_public(request.path) or _is_cors_preflight(request):
        return await handler(request)
    if request.path in ("/login", "/logout"):
        check_same_origin(request)
        return await handler(request)
    principal: Principal | None = None
    header = request.headers.get("Authorization", "")
    session_id = request.cookies.get(SESSION_COOKIE, "")
    if header.lower().startswith("bearer "):
        principal = principal_for_token(app, header[7:].strip())
    elif session_id and (principal := _principal_for_session(app, session_id)) is not None:
        check_same_origin(request)
    elif "token" in request.query:
        principal = principal_for_token(app, request.query["token"])
        if principal is not None and request.method == "GET" and not is_api_path(request.path):
            # As Jupyter does: trade the URL token for a session and drop it from the URL.
            query = {k: v for k, v in request.query.items() if k != "token"}
            response = web.HTTPFound(request.rel_url.with_query(query))
            set_session_cookie(request, response, app[SESSIONS_KEY].create(principal))
            raise response
    if principal is not None:
        request[PRINCIPAL_KEY] = principal
        _check_path_scope(request, principal)
        return await handler(request)
    if is_api_path(request.path):
        detail = "missing, wrong, revoked or expired token"
        return json_error(401, "unauthorized", detail, **{"WWW-Authenticate": "Bearer"})
    response = web.HTTPFound(URL("/login").with_query(next=str(request.rel_url)))
    if session_id:
        response.del_cookie(SESSION_COOKIE, path="/")  # ended: drop it from the browser too
    raise response


# -- the checks handlers make -------------------------------------------------------------


def principal_of(request: web.Request) -> Principal:
    """The principal the auth middleware found for `request` (public routes have none)."""
    return request[PRINCIPAL_KEY]


def require_admin(request: web.Request) -> Principal:
    """The admin principal; AdminOnlyError (403) for a project token."""
    principal = principal_of(request)
    if not principal.is_admin:
        raise AdminOnlyError(f"{request.method} {request.path} needs the admin token")
    return principal


def require_read(request: web.Request, project: str) -> Principal:
    """The principal, when it may read `project`; else UnknownProjectError (404), the answer
    for a project that does not exist."""
    principal = principal_of(request)
    if not principal.can_read(project):
        raise UnknownProjectError(f"project {project.lower()[:64]!r} does not exist")
    return principal


def require_write(request: web.Request, project: str) -> Principal:
    """The principal, when it may change `project`: 404 as :func:`require_read` when it may
    not even read it, ReadOnlyTokenError (403) when it only may."""
    principal = require_read(request, project)
    if not principal.can_write(project):
        raise ReadOnlyTokenError(f"this token may only read project {project.lower()!r}")
    return principal


async def can_read_series(request: web.Request, series_uid: str) -> bool:
    """Whether the principal may read the series: the admin always (as before, also for a
    series the index does not know yet), a project token when one of its projects is the
    token's."""
    principal = principal_of(request)
    if principal.is_admin:
        return True
    series = await request.app[INDEX_KEY].get_series(series_uid)
    return series is not None and bool(principal.readable(series.get("projects") or []))


# -- login, logout, who am I --------------------------------------------------------------


async def get_login(request: web.Request) -> web.Response:
    """A minimal login form that starts a browser session."""
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>kp-gateway login</title><link rel='stylesheet' href='/static/style.css'>"
        "</head><body>"
        "<header class='top'><h1>kp-gateway</h1></header><main class='login'>"
        "<section class='card'><h2>Log in</h2><p>Paste the admin token (the file "
        "<code>token</code> in the gateway's data directory, or the value of "
        "<code>KP_GATEWAY_HTTP_TOKEN</code>) or a project token "
        "(<code>kpt_…</code>, from the gateway's admin).</p>"
        "<form method='post'><input type='password' name='token' autofocus "
        "aria-label='API token'><input type='submit' value='Log in'></form>"
        "</section></main></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


async def post_login(request: web.Request) -> web.Response:
    """Check the posted token and start a session; the cookie holds the session's id."""
    form = await request.post()
    principal = principal_for_token(request.app, str(form.get("token", "")))
    if principal is None:
        return json_error(401, "unauthorized", "wrong, revoked or expired token")
    response = web.HTTPFound(safe_redirect_target(request.query.get("next", "/")))
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        request.app[SESSIONS_KEY].end(old)  # a new login never keeps the old session alive
    set_session_cookie(request, response, request.app[SESSIONS_KEY].create(principal))
    raise response


async def post_logout(request: web.Request) -> web.Response:
    """End the browser's session and clear its cookie; 303 to the login page (or ``/`` when
    authentication is off). Same-origin only, like every cookie write."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        request.app[SESSIONS_KEY].end(session_id)
    target = "/login" if request.app[HTTP_CONFIG_KEY].auth else "/"
    response = web.HTTPSeeOther(target)
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


async def get_whoami(request: web.Request) -> web.Response:
    """``{"admin", "project", "scope", "auth"}``: what the pages may offer this principal."""
    principal = principal_of(request)
    return web.json_response(
        {
            "admin": principal.is_admin,
            "project": principal.project,
            "scope": str(principal.scope),
            "auth": request.app[HTTP_CONFIG_KEY].auth,
        }
    )


def setup_auth(app: web.Application, cfg: HttpConfig, *, token: str, tokens: TokenStore) -> None:
    """Put the admin token, the token store and a session store on `app`; add the login,
    logout and who-am-I routes. The middleware itself is listed by ``make_app``."""
    app[ALLOWED_HOSTS_KEY] = allowed_hosts(cfg)
    app[TOKEN_KEY] = token
    app[TOKENS_KEY] = tokens
    app[SESSIONS_KEY] = SessionStore(
        idle_s=cfg.session_idle_s, max_s=cfg.session_max_s, max_sessions=cfg.max_sessions
    )
    app.router.add_get("/login", get_login)
    app.router.add_post("/login", post_login)
    app.router.add_post("/logout", post_logout)
    app.router.add_get("/api/whoami", get_whoami)


__all__ = [
    "PRINCIPAL_KEY",
    "SESSIONS_KEY",
    "SESSION_COOKIE",
    "TOKENS_KEY",
    "auth_middleware",
    "can_read_series",
    "principal_for_token",
    "principal_of",
    "require_admin",
    "require_read",
    "require_write",
    "setup_auth",
]
