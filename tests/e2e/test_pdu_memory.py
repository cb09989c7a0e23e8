"""A PDU header costs what arrived, not what it declares (issue 14, finding 2).

Before: a 6-byte A-ASSOCIATE-RQ header declaring 64 MiB made the SCP allocate (and zero) the
whole 64 MiB before any data came; 60 such connections took the gateway from 85 to 3,996 MiB.
Here unauthenticated strangers on loopback send only that header and stay silent, while DCMTK's
echoscu, a real sender, still gets through.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from tests.conftest import echoscu, held_connections

MiB = 1 << 20
ATTACKERS = 12


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_declared_pdu_length_is_not_allocated_up_front(gateway_process: Any) -> None:
    gw = gateway_process(dicom__max_associations=ATTACKERS + 4)
    assert gw.proc is not None
    before = _rss_bytes(gw.proc.pid)
    # A-ASSOCIATE-RQ (type 0x01), reserved byte, PDU length just under the 64 MiB cap. The
    # attacker is another address than echoscu's, so the per-peer share leaves echoscu room.
    header = struct.pack(">BBL", 0x01, 0x00, 64 * MiB - 1)
    with held_connections(gw.dicom_port, ATTACKERS, header, source="127.0.0.2"):
        echo = echoscu(gw.dicom_port)
        assert echo.returncode == 0, echo.stderr
        # Each attacker's read started before echoscu's association (accepted in order);
        # watch the memory for a while, since the allocation would come at once.
        peak = before
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, _rss_bytes(gw.proc.pid))
            time.sleep(0.05)
    # Old behaviour: 12 x 64 MiB = 768 MiB. Now 64 KiB each, plus threads' stacks.
    assert peak - before < 64 * MiB, f"RSS grew by {(peak - before) // MiB} MiB"
