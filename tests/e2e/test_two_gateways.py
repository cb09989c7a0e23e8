"""Two gateways on one S3 bucket and one OpenSearch index receive halves of one series.

Both gateways run as ``python -m kp_gateway serve`` subprocesses with their own data
directories (spool, lock) and share moto's S3 server and the OpenSearch stand-in, which runs
on a thread of its own with its own event loop (the test itself blocks on subprocesses).
Each gateway completes the series after its own idle time; the test checks that the shared
index ends up with one series record holding all instances, complete, and the bucket with one
thumbnail.
"""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest

from kp_gateway.kaapana.keys import (
    KEY_COMPLETE,
    KEY_MAX_IN,
    KEY_MIN_IN,
    KEY_MISSING_IN,
    KEY_SLICE_SPACING,
    KEY_THUMBNAIL,
    KEY_VALIDATION,
    STATUS_VALIDATED,
    VAL_STATUS,
)
from tests.conftest import (
    GatewayProcess,
    dataset_bytes,
    make_ct_series,
    requires_dcmtk,
    run_dcmsend,
    wait_until,
)
from tests.e2e.test_s3_backend import dataset_bytes_of, download, s3_settings, sop_uid
from tests.opensearch_standin import Standin
from tests.s3_support import MotoS3, unique_bucket
from tests.s3_support import isolated_aws_env as isolated_aws_env
from tests.s3_support import moto_s3 as moto_s3

pytestmark = [pytest.mark.e2e, requires_dcmtk]

COUNT = 20
CALLING = "kp-split"  # dataset "split"
DATASET = "split"


class StandinThread:
    """The OpenSearch stand-in served by an event loop on a daemon thread of its own."""

    def __init__(self) -> None:
        self.standin = Standin()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="opensearch-standin", daemon=True
        )

    @property
    def url(self) -> str:
        return self.standin.url

    def start(self) -> StandinThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.standin.start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.standin.stop(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()


@pytest.fixture
def opensearch() -> Iterator[StandinThread]:
    server = StandinThread().start()
    yield server
    server.stop()


def log_count(gw: GatewayProcess, pattern: str) -> int:
    return len(re.findall(pattern, gw.log.read_text(errors="replace")))


def get_json_or_none(gw: GatewayProcess, path: str) -> Any:
    try:
        return gw.get_json(path)
    except urllib.error.HTTPError:
        return None


def wait_for_stages(gw: GatewayProcess, series_uid: str) -> None:
    """Wait until `gw` ran the series stages; validation is the last, so after its log line
    every write of that gateway for the series is done."""
    pattern = rf"series {re.escape(series_uid)} validated"
    wait_until(lambda: log_count(gw, pattern) >= 1, 45, f"series stages logged in {gw.log}")


def send(gw: GatewayProcess, folder: Path) -> None:
    result = run_dcmsend(gw.dicom_port, folder, calling=CALLING, called="kp-admin", timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("arrival", ["together", "apart"])
def test_series_split_across_two_gateways_is_one_complete_series_with_one_thumbnail(
    gateway_process: Callable[..., GatewayProcess],
    moto_s3: MotoS3,
    opensearch: StandinThread,
    tmp_path: Path,
    arrival: str,
) -> None:
    """Odd slices to gateway 1, even slices to gateway 2, at the same time ("together") or
    the second half only after gateway 1 completed the first ("apart"): both gateways show
    one series of 20 instances, complete with no missing numbers, every instance downloads
    byte-identical from either, and the bucket holds one thumbnail."""
    bucket = unique_bucket("two")
    shared: dict[str, Any] = {
        **s3_settings(moto_s3, bucket),
        "index__backend": "opensearch",
        "index__opensearch_url": opensearch.url,
        "index__opensearch_verify_tls": False,
        "pipeline__series_idle_s": 1.0,
    }
    paths = make_ct_series(tmp_path / "src", COUNT)
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    # Interleaved halves: a completion that saw only one gateway's half reports gaps.
    halves = [tmp_path / "half1", tmp_path / "half2"]
    for n, path in enumerate(paths):
        target = halves[n % 2] / path.name
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
    originals = {sop_uid(p): dataset_bytes(p) for half in halves for p in half.iterdir()}
    assert len(originals) == COUNT

    gateways = [gateway_process(tmp_path / f"gw{n}" / "data", **shared) for n in (1, 2)]
    if arrival == "together":
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(send, gateways, halves))
        for gw in gateways:
            wait_for_stages(gw, series_uid)
    else:
        send(gateways[0], halves[0])
        wait_for_stages(gateways[0], series_uid)
        # Gateway 1 completed what it had: odd numbers 1..19, the even ones missing.
        doc = gateways[1].get_json(f"/api/series/{series_uid}")["document"]
        assert doc[KEY_COMPLETE] is False
        assert (doc[KEY_MIN_IN], doc[KEY_MAX_IN]) == (1, COUNT - 1)
        assert doc[KEY_MISSING_IN] == list(range(2, COUNT - 1, 2))
        send(gateways[1], halves[1])
        wait_for_stages(gateways[1], series_uid)

    # Each gateway completed the series once, for the instances it received.
    for gw in gateways:
        assert log_count(gw, rf"series {re.escape(series_uid)} complete\b") == 1
        assert log_count(gw, rf"thumbnail of {re.escape(series_uid)} written") == 1

    client = moto_s3.client()
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    keys = sorted(item["Key"] for item in listed)
    assert [k for k in keys if k.startswith("thumbnails/")] == [f"thumbnails/{series_uid}.png"]
    assert [k for k in keys if k.startswith("validation/")] == [f"validation/{series_uid}.html"]
    assert sum(k.startswith("dicom/") for k in keys) == COUNT
    # Same series, project and dataset: both gateways write the one routing record key.
    assert len([k for k in keys if k.startswith(f"routing/{series_uid}/")]) == 1
    png = client.get_object(Bucket=bucket, Key=f"thumbnails/{series_uid}.png")["Body"].read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    if arrival == "apart":
        # The later completion's stages ran over all 20 slices and overwrote the first's.
        report = client.get_object(Bucket=bucket, Key=f"validation/{series_uid}.html")
        html = report["Body"].read().decode()
        assert 'data-complete="yes"' in html
        assert 'data-missing-instance-numbers=""' in html

    for gw in gateways:
        for listing in (
            "/api/projects/admin/series",
            f"/api/projects/admin/series?dataset={DATASET}",
        ):
            page = gw.get_json(listing)
            assert page["total"] == 1, (listing, page)
            (item,) = page["items"]
            assert item["series_uid"] == series_uid
            assert item["instance_count"] == COUNT, (listing, item)
            assert item["complete"] is True
            assert item["datasets"] == [DATASET]
            assert item["has_thumbnail"] is True
        datasets = {d["name"]: d for d in gw.get_json("/api/projects/admin/datasets")["items"]}
        assert datasets[DATASET]["series_count"] == 1
        assert datasets[DATASET]["instance_count"] == COUNT

        series = get_json_or_none(gw, f"/api/series/{series_uid}")
        assert series is not None
        assert series["instance_count"] == COUNT
        assert series["complete"] is True
        assert series["projects"] == ["admin"]
        assert series["datasets"] == [{"project": "admin", "dataset": DATASET}]
        doc = series["document"]
        assert doc[KEY_COMPLETE] is True, doc
        assert doc[KEY_MIN_IN] == 1
        assert doc[KEY_MAX_IN] == COUNT
        assert not doc.get(KEY_MISSING_IN), doc[KEY_MISSING_IN]
        assert doc[KEY_THUMBNAIL] in originals
        assert doc[KEY_VALIDATION][VAL_STATUS] == STATUS_VALIDATED
        if arrival == "apart":
            assert doc[KEY_SLICE_SPACING] == 1.0  # not 2.0, the spacing of one half

        instances = gw.get_json(f"/api/series/{series_uid}/instances")
        assert instances["total"] == COUNT
        assert {i["sop_uid"] for i in instances["items"]} == set(originals)
        numbers = sorted(i["instance_number"] for i in instances["items"])
        assert numbers == list(range(1, COUNT + 1))
        for uid, expected in originals.items():
            stored = download(gw, f"/api/instances/{uid}")
            assert stored is not None, uid
            assert dataset_bytes_of(stored) == expected, uid
        assert download(gw, f"/api/series/{series_uid}/thumbnail") == png
        assert gw.get_json("/api/quarantine")["items"] == []

    for gw in gateways:
        assert gw.stop() == 0
