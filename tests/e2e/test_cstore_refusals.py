"""End to end: C-STOREs the store stage would refuse get a failure status, never 0x0000.

A pynetdicom SCU sends crafted files byte for byte (chunked sending streams the file's
dataset without decoding it, as a broken or hostile modality would) to a gateway subprocess;
every hostile case is answered with a failure, nothing of it reaches storage, the index or the
quarantine, and a normal instance on the same association still gets 0x0000.
"""

from __future__ import annotations

import struct
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.conftest import GatewayProcess, make_ct_series, wait_until

pytestmark = [pytest.mark.e2e]

CT = str(CTImageStorage)
CANNOT_UNDERSTAND = 0xC210
DATASET_MISMATCH = 0xA900

_STUDY = b"\x20\x00\x0d\x00UI"
_SERIES = b"\x20\x00\x0e\x00UI"
_SOP_INSTANCE = b"\x08\x00\x18\x00UI"


def _with_uid(data: bytes, tag_and_vr: bytes, value: bytes) -> bytes:
    """`data` (a Part-10 file, explicit VR little endian) with one UI element's value replaced;
    the file meta (group 0002) is left alone, so the C-STORE request keeps its valid UIDs."""
    at = data.index(tag_and_vr, 132 + 12)
    (old_length,) = struct.unpack_from("<H", data, at + 6)
    padded = value + b"\x00" if len(value) % 2 else value
    header = tag_and_vr + struct.pack("<H", len(padded))
    return data[:at] + header + padded + data[at + 8 + old_length :]


def _rle_ct(path: Path) -> bytes:
    """A CT whose Pixel Data is encapsulated (RLE Lossless): two fragments and a delimiter."""
    ds = pydicom.dcmread(path)
    frame = bytes(ds.PixelData)
    ds.file_meta.TransferSyntaxUID = RLELossless
    # The gateway never decodes pixels: two fragments of the raw frame stand in for RLE data.
    half = len(frame) // 2
    ds.PixelData = encapsulate([frame[:half], frame[half:]], fragments_per_frame=2)
    ds["PixelData"].VR = "OB"
    out = path.with_suffix(".rle.dcm")
    ds.save_as(out, enforce_file_format=True)
    return out.read_bytes()


def _hostile_cases(folder: Path) -> list[tuple[str, bytes, int]]:
    (ct,) = make_ct_series(folder / "ct", 1, rows=64)
    whole = ct.read_bytes()
    sop_uid = str(pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID).encode()
    native_pixels = whole.index(b"\xe0\x7f\x10\x00OW")
    (pixel_length,) = struct.unpack_from("<I", whole, native_pixels + 8)
    declared_short = (
        whole[: native_pixels + 8]
        + struct.pack("<I", pixel_length - 512)
        + whole[native_pixels + 12 : -512]
    )
    rle = _rle_ct(ct)
    # Same length as the request's UID, so only the dataset differs from the request.
    other_uid = sop_uid[:-1] + (b"7" if sop_uid[-1:] != b"7" else b"8")
    refused, mismatch = CANNOT_UNDERSTAND, DATASET_MISMATCH
    return [
        ("study UID with ../", _with_uid(whole, _STUDY, b"../../etc/passwd"), refused),
        ("series UID with /", _with_uid(whole, _SERIES, b"1.2/3.4"), refused),
        ("SOP instance UID with NUL", _with_uid(whole, _SOP_INSTANCE, b"1.2\x003.4"), refused),
        ("non-ASCII study UID", _with_uid(whole, _STUDY, b"1.2.3.\xe9"), refused),
        ("series UID over 64", _with_uid(whole, _SERIES, b"1." + b"2" * 70), refused),
        ("empty study UID", _with_uid(whole, _STUDY, b""), refused),
        ("cut mid-element", whole[: native_pixels - 7], refused),
        ("cut inside native Pixel Data", whole[:-1000], refused),
        ("native Pixel Data declared short", declared_short, refused),
        ("cut inside an encapsulated fragment", rle[:-100], refused),
        ("encapsulated without its delimiter", rle[:-8], refused),
        ("SOP instance UID not the request's",
         _with_uid(whole, _SOP_INSTANCE, other_uid), mismatch),
    ]  # fmt: skip


def _send(port: int, files: list[Path]) -> list[int]:
    """Send each file as it is on disk, on one association; the statuses."""
    ae = AE(ae_title="kp-hostile")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    ae.add_requested_context(CT, [RLELossless])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="kp-admin")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in files]
    finally:
        assoc.release()


@pytest.mark.parametrize("mode", ["chunked", "memory"])
def test_hostile_cstores_are_refused_and_nothing_is_kept(
    gateway_process: Callable[..., GatewayProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """Each hostile dataset gets its failure status; then a normal one gets 0x0000, and only
    it is stored, indexed; nothing is quarantined or left in the spool."""
    gw = gateway_process(dicom__receive_mode=mode)
    cases = _hostile_cases(tmp_path / "made")
    files = []
    for number, (_, data, _) in enumerate(cases):
        path = tmp_path / f"hostile{number:02d}.dcm"
        path.write_bytes(data)
        files.append(path)
    (normal,) = make_ct_series(tmp_path / "normal", 1)
    # The SCU streams each file's dataset without decoding it (the client side only).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    statuses = _send(gw.dicom_port, [*files, normal])

    names = [name for name, _, _ in cases]
    expected = [status for _, _, status in cases]
    assert list(zip(names, statuses[:-1], strict=True)) == list(zip(names, expected, strict=True))
    assert statuses[-1] == 0x0000

    def normal_indexed() -> bool:
        datasets = gw.get_json("/api/projects/admin/datasets")["items"]
        return sum(d["instance_count"] for d in datasets) == 1

    wait_until(normal_indexed, what="the normal instance indexed")
    assert gw.get_json("/api/projects/admin/series")["total"] == 1
    assert gw.get_json("/api/quarantine")["items"] == []
    stored = list((gw.data_dir / "dicom").rglob("*.dcm"))
    assert [p.name for p in stored] == [
        f"{pydicom.dcmread(normal, stop_before_pixels=True).SOPInstanceUID}.dcm"
    ]

    def spool_holds_no_data() -> bool:
        # Left: the association's routing.json and the empty files created ahead of need.
        spool = gw.data_dir / "spool"
        files = [p for p in spool.rglob("*") if p.is_file() and p.name != "routing.json"]
        return all(p.stat().st_size == 0 for p in files)

    wait_until(spool_holds_no_data, what="no dataset left in the spool")
    with urllib.request.urlopen(gw.url("/metrics"), timeout=10) as response:
        metrics = response.read().decode()
    refused = sum(1 for status in expected if status == CANNOT_UNDERSTAND)
    assert f'cstore_total{{status="0xC210"}} {float(refused)}' in metrics
    assert 'cstore_total{status="0xA900"} 1.0' in metrics
