"""Idle and slow HTTP connections cannot stop the gateway (issue 14, finding 1).

Before: ~960 silent HTTP connections pushed every new association's socket past descriptor
1024, where pynetdicom's ``select`` fails, so every C-STORE sender died (dcmsend exit 61) with
nothing logged; and the HTTP server never closed idle connections. Here a stranger on loopback
holds connections open while DCMTK's echoscu and storescu, real senders, keep working.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import (
    closed_by_peer,
    dcmtk_env,
    echoscu,
    held_connections,
    make_ct_series,
    wait_until,
)


def test_dicom_works_with_1100_http_connections_open(gateway_process: Any, tmp_path: Path) -> None:
    """Associations get descriptors above 1024 and still work (poll, not select)."""
    gw = gateway_process(http__max_connections=2000)
    series = make_ct_series(tmp_path / "ct", 2)
    with held_connections(gw.http_port, 1100):
        wait_until(
            lambda: len(list(Path(f"/proc/{gw.proc.pid}/fd").iterdir())) > 1100,
            what="the gateway holding the HTTP connections",
        )
        echo = echoscu(gw.dicom_port)
        assert echo.returncode == 0, echo.stderr
        store = subprocess.run(
            ["storescu", "-aec", "kp-admin", "127.0.0.1", str(gw.dicom_port), *map(str, series)],
            capture_output=True,
            env=dcmtk_env(),
            timeout=60,
        )
        assert store.returncode == 0, store.stderr
    wait_until(
        lambda: gw.get_json("/api/projects/admin/datasets")["items"] != [],
        what="the stored series indexed",
    )


def test_idle_and_slow_header_connections_are_closed(gateway_process: Any) -> None:
    """Silent connections and ones that never finish their headers are closed after
    ``http.idle_timeout_s``; the server keeps answering meanwhile."""
    gw = gateway_process(http__idle_timeout_s=1)
    with (
        held_connections(gw.http_port, 20) as silent,
        held_connections(
            gw.http_port, 20, b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow:"
        ) as slow,
    ):
        assert gw.get_json("/health/live") == {"status": "alive"}
        wait_until(
            lambda: all(closed_by_peer(s) for s in silent + slow),
            timeout_s=30,
            what="idle connections closed by the gateway",
        )


def test_connections_past_the_limit_are_closed_at_once(gateway_process: Any) -> None:
    gw = gateway_process(http__max_connections=50, http__idle_timeout_s=600)
    with held_connections(gw.http_port, 80) as held:
        wait_until(
            lambda: sum(closed_by_peer(s) for s in held) >= 30,
            what="connections past the limit closed",
        )
    wait_until(lambda: _live(gw), what="the gateway answering again once they left")


def test_stalled_upload_body_is_cut_off(gateway_process: Any) -> None:
    """A POST that promises 1000 bytes, sends 10 and stalls is ended after
    ``http.body_timeout_s``; nothing of it is kept."""
    gw = gateway_process(http__body_timeout_s=1)
    request = (
        b"POST /api/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
        + b"0123456789"
    )
    with held_connections(gw.http_port, 1, request) as (s,):
        s.settimeout(30)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"cut off" in answer
    assert gw.get_json("/api/uploads")["items"] == []


def _live(gw: Any) -> bool:
    try:
        with urllib.request.urlopen(gw.url("/health/live"), timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        time.sleep(0.05)
        return False
