"""The project-token routes, admin only::

    POST   /api/projects/{project}/tokens        {"scope", "label", "expires_in_days"} -> 201
    GET    /api/projects/{project}/tokens        the live tokens, without secrets
    DELETE /api/projects/{project}/tokens/{id}   revoke -> 204; its sessions end at once

The secret is in the 201 answer only; the gateway keeps its SHA-256 (:mod:`kp_gateway.tokens`).
Handlers run on the event loop.
"""

from __future__ import annotations

import time

from aiohttp import web

from kp_gateway.access import Scope
from kp_gateway.errors import RejectedInputError
from kp_gateway.http.api import json_body, require_project
from kp_gateway.http.auth import SESSIONS_KEY, TOKENS_KEY, require_admin
from kp_gateway.kaapana.keys import ADMIN_PROJECT

DEFAULT_EXPIRY_DAYS = 90
MAX_EXPIRY_DAYS = 3650
MAX_LABEL_CHARS = 100
_DAY_S = 86400.0


async def _token_project(request: web.Request) -> str:
    require_admin(request)
    project = await require_project(request, request.match_info["project"])
    if project == ADMIN_PROJECT:
        # admin is the union of every project: a token for it would be a second admin token.
        raise RejectedInputError(
            "project 'admin' holds every project's series; use the admin token for it"
        )
    return project


def _int_field(body: dict[str, object], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RejectedInputError(f"{name} must be an integer from {lo} to {hi}")
    return value


async def post_token(request: web.Request) -> web.Response:
    """Create a token for the project; 201 with the secret (``token``), shown this once.

    ``scope`` is ``read`` (default) or ``read-write``; ``label`` says whom it is for;
    ``expires_in_days`` is 1 to 3650 (default 90). 400 for bad fields or project ``admin``,
    404 for an unknown project, 429 past ``http.max_tokens``.
    """
    project = await _token_project(request)
    body = await json_body(request)
    unknown = set(body) - {"scope", "label", "expires_in_days"}
    if unknown:
        raise RejectedInputError(f"unknown field(s) {', '.join(sorted(unknown))}")
    try:
        scope = Scope(body.get("scope", Scope.READ))
    except ValueError:
        raise RejectedInputError("scope must be 'read' or 'read-write'") from None
    label = body.get("label", "")
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise RejectedInputError(f"label must be printable text of at most {MAX_LABEL_CHARS}")
    days = _int_field(body, "expires_in_days", DEFAULT_EXPIRY_DAYS, 1, MAX_EXPIRY_DAYS)
    token, secret = await request.app[TOKENS_KEY].create(
        project, scope, label.strip(), expires_at=time.time() + days * _DAY_S
    )
    return web.json_response({**token.public(), "token": secret}, status=201)


async def get_tokens(request: web.Request) -> web.Response:
    """The project's live tokens, oldest first, without secrets."""
    project = await _token_project(request)
    tokens = await request.app[TOKENS_KEY].of_project(project)
    return web.json_response({"items": [t.public() for t in tokens]})


async def delete_token(request: web.Request) -> web.Response:
    """Revoke one token: it stops authenticating and its browser sessions end; 204."""
    project = await _token_project(request)
    token = await request.app[TOKENS_KEY].revoke(project, request.match_info["id"])
    request.app[SESSIONS_KEY].end_for_tokens({token.id})
    return web.Response(status=204)


def setup_token_api(app: web.Application) -> None:
    """Add the token routes to `app` (built by :func:`kp_gateway.http.app.make_app`)."""
    app.router.add_post("/api/projects/{project}/tokens", post_token)
    app.router.add_get("/api/projects/{project}/tokens", get_tokens)
    app.router.add_delete("/api/projects/{project}/tokens/{id}", delete_token)


__all__ = ["setup_token_api"]
