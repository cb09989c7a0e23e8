"""The access model without HTTP: principals, the project-token store (hashed, expiring,
revocable, bounded, persisted) and browser sessions (idle, absolute, bounded)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from kp_gateway.access import ADMIN, Principal, Scope
from kp_gateway.durable import write_atomic
from kp_gateway.errors import TokenQuotaError, UnknownTokenError
from kp_gateway.http.sessions import SessionStore
from kp_gateway.tokens import TokenStore


class Clock:
    """A clock the test moves by hand (no sleeping)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("principal", "project", "read", "write"),
    [
        (ADMIN, "admin", True, True),
        (ADMIN, "lung", True, True),
        (Principal("lung", Scope.READ_WRITE, "t1"), "lung", True, True),
        (Principal("lung", Scope.READ_WRITE, "t1"), "LUNG", True, True),
        (Principal("lung", Scope.READ_WRITE, "t1"), "brain", False, False),
        (Principal("lung", Scope.READ_WRITE, "t1"), "admin", False, False),
        (Principal("lung", Scope.READ, "t2"), "lung", True, False),
        (Principal("lung", Scope.READ, "t2"), "brain", False, False),
    ],
)
def test_principal_decides_read_and_write(
    principal: Principal, project: str, read: bool, write: bool
) -> None:
    """The one access rule: admin everything; a token its own project, writing with read-write."""
    assert principal.can_read(project) is read
    assert principal.can_write(project) is write
    assert principal.is_admin is (principal is ADMIN)


async def test_token_secret_is_stored_only_as_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = TokenStore(path, max_tokens=10, fsync=False)
    token, secret = await store.create("lung", Scope.READ, "alice", expires_at=2e9)
    assert secret.startswith(f"kpt_{token.id}_") and len(secret) > 50
    raw = path.read_text()
    assert secret not in raw and secret.split("_", 2)[2] not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(raw)["tokens"][0]["sha256"] == token.sha256
    assert store.verify(secret) == token
    for wrong in (secret[:-1] + ("A" if secret[-1] != "A" else "B"), "kpt_", "kpt_x_y", "", "ä"):
        assert store.verify(wrong) is None
    # A restart reads the same records: the token still works, and only with its secret.
    again = TokenStore.load(path, max_tokens=10, fsync=False)
    assert again.verify(secret) == token
    assert "sha256" not in token.public() and "token" not in token.public()


async def test_expired_and_revoked_tokens_stop_and_are_pruned(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "tokens.json"
    store = TokenStore(path, max_tokens=10, fsync=False, clock=clock)
    short, short_secret = await store.create("lung", Scope.READ, "", expires_at=clock.now + 60)
    kept, kept_secret = await store.create(
        "lung", Scope.READ_WRITE, "", expires_at=clock.now + 3600
    )
    other, _ = await store.create("brain", Scope.READ, "", expires_at=clock.now + 3600)
    clock.now += 61
    assert store.verify(short_secret) is None and not store.active(short.id)
    assert [t.id for t in await store.of_project("lung")] == [kept.id]
    assert short.id not in path.read_text()  # listing pruned the file too
    with pytest.raises(UnknownTokenError):
        await store.revoke("brain", kept.id)  # another project's token is not found there
    await store.revoke("lung", kept.id)
    assert store.verify(kept_secret) is None
    assert await store.revoke_project("brain") == [other.id]
    assert json.loads(path.read_text())["tokens"] == []


async def test_token_count_is_bounded(tmp_path: Path) -> None:
    clock = Clock()
    store = TokenStore(tmp_path / "tokens.json", max_tokens=2, fsync=False, clock=clock)
    await store.create("a", Scope.READ, "", expires_at=clock.now + 10)
    await store.create("a", Scope.READ, "", expires_at=clock.now + 1000)
    with pytest.raises(TokenQuotaError):
        await store.create("b", Scope.READ, "", expires_at=clock.now + 1000)
    clock.now += 11  # an expired token no longer counts
    await store.create("b", Scope.READ, "", expires_at=clock.now + 1000)


def test_unreadable_records_are_skipped_at_load(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    good = {
        "id": "0123456789ab",
        "project": "lung",
        "scope": "read",
        "label": "",
        "sha256": "00" * 32,
        "created_at": 1.0,
        "expires_at": 9e9,
    }
    write_atomic(path, {"version": 1, "tokens": [good, {"id": "x"}, {**good, "scope": "all"}, 5]})
    store = TokenStore.load(path, max_tokens=10)
    assert store.active("0123456789ab")
    path.write_text("{not json")
    assert not TokenStore.load(path, max_tokens=10).active("0123456789ab")


def test_sessions_expire_idle_and_absolute_and_are_bounded() -> None:
    clock = Clock(0.0)
    sessions = SessionStore(idle_s=100, max_s=250, max_sessions=2, clock=clock)
    reader = Principal("lung", Scope.READ, "t1")
    first = sessions.create(ADMIN)
    assert sessions.get(first) is ADMIN
    clock.now = 90
    assert sessions.get(first) is ADMIN  # used: the idle time starts again
    clock.now = 180
    assert sessions.get(first) is ADMIN
    clock.now = 260
    assert sessions.get(first) is None  # 260 s after login: past the absolute limit
    idle = sessions.create(ADMIN)
    clock.now = 361
    assert sessions.get(idle) is None  # 101 s unused
    a, b, c = (sessions.create(reader) for _ in range(3))
    assert sessions.get(a) is None and sessions.get(c) == reader  # the oldest made room
    assert len(sessions) == 2
    assert sessions.end_for_tokens({"t1"}) == 2 and sessions.get(b) is None
    d = sessions.create(ADMIN)
    assert sessions.end(d) and not sessions.end(d)
