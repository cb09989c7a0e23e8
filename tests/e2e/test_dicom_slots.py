"""What does not progress is timed out, and one peer cannot take every association slot
(issue 14, finding 3).

Before: 32 connections that sent 20 bytes of an A-ASSOCIATE-RQ and stopped held every slot
until the attacker left (the DUL thread blocked in ``recv``, so the ARTIM timer never ran), and
silent connections held theirs for 16-30 s. Here the attacker connects from 127.0.0.2 and DCMTK's
echoscu, a real sender, from 127.0.0.1.
"""

from __future__ import annotations

import struct
from typing import Any

from tests.conftest import closed_by_peer, echoscu, held_connections, wait_until

ATTACKER = "127.0.0.2"


def test_partial_pdus_and_silent_connections_leave_room_and_time_out(
    gateway_process: Any,
) -> None:
    gw = gateway_process(dicom__max_associations=8, dicom__pdu_timeout_s=2, dicom__acse_timeout_s=2)
    # 20 bytes of an A-ASSOCIATE-RQ that declares 200: the read of the rest never completes.
    partial = struct.pack(">BBL", 0x01, 0x00, 200) + b"\x00\x01" + b"\x00" * 12
    for payload in (partial, b""):
        with held_connections(gw.dicom_port, 32, payload, source=ATTACKER) as held:
            echo = echoscu(gw.dicom_port)
            assert echo.returncode == 0, echo.stderr
            wait_until(
                lambda held=held: all(closed_by_peer(s) for s in held),
                timeout_s=30,
                what="the attacker's connections timed out",
            )
    log = gw.log.read_text()
    assert "dicom.max_associations_per_peer" in log
