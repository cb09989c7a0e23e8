"""Browser sessions: what the session cookie stands for, kept in memory.

The login page and a page opened with ``?token=`` create a session: a random id in the cookie,
mapped here to the :class:`~kp_gateway.access.Principal` the token stood for. The cookie never
holds a token, so a leaked cookie dies with its session (logout, idle or absolute expiry,
revocation of its project token) and a stolen cookie jar does not leak a reusable credential.
Sessions live in memory: a restart logs every browser out.

Runs on the event loop only.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kp_gateway.access import Principal


@dataclass(slots=True)
class _Session:
    principal: Principal
    created: float
    last_seen: float


def _key(session_id: str) -> str:
    # Looked up by digest: a dict probe with the raw id would compare it byte by byte.
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).hexdigest()


class SessionStore:
    """At most `max_sessions` sessions; each ends after `idle_s` unused or `max_s` in all.

    Creating one past the bound ends the oldest. `clock` (monotonic seconds) is replaced in
    tests.
    """

    def __init__(
        self,
        *,
        idle_s: float,
        max_s: float,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self.max_sessions = max_sessions
        self._clock = clock
        # Oldest first: creation order, so eviction and expiry sweeps start at the front.
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, principal: Principal) -> str:
        """A new session for `principal`; returns its id (the cookie's value)."""
        now = self._clock()
        self._sweep(now)
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session_id = secrets.token_urlsafe(32)
        self._sessions[_key(session_id)] = _Session(principal, now, now)
        return session_id

    def get(self, session_id: str) -> Principal | None:
        """The principal of a live session (and it counts as used now), else None."""
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self.idle_s or now - session.created > self.max_s:
            del self._sessions[key]
            return None
        session.last_seen = now
        return session.principal

    def end(self, session_id: str) -> bool:
        """End one session (logout); whether it existed."""
        return self._sessions.pop(_key(session_id), None) is not None

    def end_for_tokens(self, token_ids: set[str]) -> int:
        """End every session of the project tokens `token_ids` (revoked); returns how many."""
        doomed = [k for k, s in self._sessions.items() if s.principal.token_id in token_ids]
        for key in doomed:
            del self._sessions[key]
        return len(doomed)

    def _sweep(self, now: float) -> None:
        """Drop sessions past their absolute limit (the oldest come first) or idle too long."""
        stale = [
            k
            for k, s in self._sessions.items()
            if now - s.created > self.max_s or now - s.last_seen > self.idle_s
        ]
        for key in stale:
            del self._sessions[key]


__all__ = ["SessionStore"]
