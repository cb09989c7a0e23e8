"""Project tokens: created for one project with a scope, stored hashed, revocable, expiring.

A token's secret is ``kpt_<id>_<43 random characters>``: the id finds the record, and only the
SHA-256 of the whole secret is kept (256 random bits need no slow key derivation: there is
nothing to guess a password from). The records live in ``<data dir>/tokens.json`` (mode 0600,
replaced atomically), so tokens survive a restart. Expired tokens authenticate nothing and are
dropped from the file at the next change or listing.

:meth:`TokenStore.load` is blocking (start-up, via ``asyncio.to_thread``); the other methods
run on the event loop and write the file in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kp_gateway.access import Principal, Scope
from kp_gateway.durable import write_atomic
from kp_gateway.errors import TokenQuotaError, UnknownTokenError

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "kpt_"
_ID_HEX = 12  # 48 bits: ids only need to be unique, the secret part carries the entropy
_FILE_VERSION = 1


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectToken:
    """One project token as stored: everything but the secret, which only its digest stands for.

    Times are seconds since the epoch, as in upload records.
    """

    id: str
    project: str
    scope: Scope
    label: str
    sha256: str
    created_at: float
    expires_at: float

    @property
    def principal(self) -> Principal:
        """What a request carrying this token may do."""
        return Principal(project=self.project, scope=self.scope, token_id=self.id)

    def public(self) -> dict[str, Any]:
        """The JSON the API shows: no digest, no secret."""
        return {
            "id": self.id,
            "project": self.project,
            "scope": str(self.scope),
            "label": self.label,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }


def _parse(item: Any) -> ProjectToken | None:
    try:
        return ProjectToken(
            id=str(item["id"]),
            project=str(item["project"]),
            scope=Scope(item["scope"]),
            label=str(item["label"]),
            sha256=str(item["sha256"]),
            created_at=float(item["created_at"]),
            expires_at=float(item["expires_at"]),
        )
    except (TypeError, KeyError, ValueError):
        return None


class TokenStore:
    """The project tokens of one gateway, in memory and in ``tokens.json``.

    At most `max_tokens` live tokens: creating one more raises TokenQuotaError (429).
    `clock` gives the time (seconds since the epoch) and is replaced in tests.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_tokens: int,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_tokens = max_tokens
        self._fsync = fsync
        self._clock = clock
        self._tokens: dict[str, ProjectToken] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        max_tokens: int,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> TokenStore:
        """Blocking. The store with the records of `path` (none when the file does not exist).

        A record that cannot be read is skipped with a warning rather than stopping start-up;
        the token it stood for no longer authenticates.
        """
        store = cls(path, max_tokens=max_tokens, fsync=fsync, clock=clock)
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return store
        except (OSError, ValueError) as exc:
            logger.warning("cannot read %s (%s); project tokens start empty", path, exc)
            return store
        items = doc.get("tokens") if isinstance(doc, dict) else None
        for item in items if isinstance(items, list) else []:
            token = _parse(item)
            if token is None:
                logger.warning("skipped an unreadable project token record in %s", path)
                continue
            store._tokens[token.id] = token
        return store

    # -- authentication (sync, in memory) ---------------------------------------------------

    def verify(self, secret: str) -> ProjectToken | None:
        """The live token whose secret is `secret`, else None (unknown, revoked or expired)."""
        if not secret.startswith(TOKEN_PREFIX):
            return None
        token = self._tokens.get(secret[len(TOKEN_PREFIX) :].split("_", 1)[0])
        if token is None or not self._live(token):
            return None
        if not hmac.compare_digest(_digest(secret), token.sha256):
            return None
        return token

    def active(self, token_id: str) -> bool:
        """Whether `token_id` still authenticates (a session checks it on every request)."""
        token = self._tokens.get(token_id)
        return token is not None and self._live(token)

    def _live(self, token: ProjectToken) -> bool:
        return token.expires_at > self._clock()

    # -- management (event loop; each change rewrites the file) ---------------------------

    async def create(
        self, project: str, scope: Scope, label: str, *, expires_at: float
    ) -> tuple[ProjectToken, str]:
        """A new token for `project`; returns its record and its secret (shown once).

        Raises TokenQuotaError (429) when ``max_tokens`` live tokens exist.
        """
        async with self._lock:
            self._prune()
            if len(self._tokens) >= self.max_tokens:
                raise TokenQuotaError(
                    f"the gateway holds {len(self._tokens)} project tokens, the most "
                    f"http.max_tokens allows; revoke unused ones first"
                )
            token_id = secrets.token_hex(_ID_HEX // 2)
            while token_id in self._tokens:  # pragma: no cover - 48 random bits
                token_id = secrets.token_hex(_ID_HEX // 2)
            secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
            token = ProjectToken(
                id=token_id,
                project=project,
                scope=scope,
                label=label,
                sha256=_digest(secret),
                created_at=self._clock(),
                expires_at=expires_at,
            )
            self._tokens[token_id] = token
            try:
                await self._save()
            except BaseException:
                del self._tokens[token_id]  # a token that is not on disk is not handed out
                raise
        logger.info("project token %s created for project %s (%s)", token_id, project, scope)
        return token, secret

    async def of_project(self, project: str) -> list[ProjectToken]:
        """The live tokens of `project`, oldest first; expired ones are dropped from the file."""
        async with self._lock:
            if self._prune():
                await self._save()
            tokens = [t for t in self._tokens.values() if t.project == project]
        return sorted(tokens, key=lambda t: (t.created_at, t.id))

    async def revoke(self, project: str, token_id: str) -> ProjectToken:
        """Remove one token of `project`; it stops authenticating at once.

        Raises UnknownTokenError (404) when `project` has no token `token_id`.
        """
        async with self._lock:
            token = self._tokens.get(token_id)
            if token is None or token.project != project:
                raise UnknownTokenError(f"project {project!r} has no token {token_id[:40]!r}")
            del self._tokens[token_id]
            self._prune()
            await self._save()
        logger.info("project token %s of project %s revoked", token_id, project)
        return token

    async def revoke_project(self, project: str) -> list[str]:
        """Remove every token of `project` (the project was deleted); returns their ids."""
        async with self._lock:
            ids = [t.id for t in self._tokens.values() if t.project == project]
            for token_id in ids:
                del self._tokens[token_id]
            if ids or self._prune():
                await self._save()
        if ids:
            logger.info("revoked %d tokens of deleted project %s", len(ids), project)
        return ids

    def _prune(self) -> bool:
        expired = [t.id for t in self._tokens.values() if not self._live(t)]
        for token_id in expired:
            del self._tokens[token_id]
        return bool(expired)

    async def _save(self) -> None:
        doc = {
            "version": _FILE_VERSION,
            "tokens": [
                {**asdict(t), "scope": str(t.scope)}
                for t in sorted(self._tokens.values(), key=lambda t: t.created_at)
            ],
        }
        await asyncio.to_thread(write_atomic, self.path, doc, fsync=self._fsync, mode=0o600)


__all__ = ["TOKEN_PREFIX", "ProjectToken", "TokenStore"]
