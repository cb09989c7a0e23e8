"""tus-js-client (from the npm registry, run by Node) against the gateway's tus endpoint."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kp_gateway.config import Config
from tests.conftest import REPO, make_ct_series

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("npm") is None, reason="Node.js/npm is not installed"),
]

SCRIPT = Path(__file__).with_name("tus_upload.js")
# Installed once per machine beside the checkout's other caches (git-ignored), then reused.
NODE_PREFIX = REPO / ".cache" / "tus-js-client"


@pytest.fixture(scope="session")
def tus_js_client() -> Path:
    """tus-js-client 4 installed from the npm registry into a cached folder."""
    if not (NODE_PREFIX / "node_modules" / "tus-js-client").is_dir():
        NODE_PREFIX.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(NODE_PREFIX), "--no-audit", "--no-fund",
             "--silent", "tus-js-client@4"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    return NODE_PREFIX / "node_modules"


async def _tus(node_modules: Path, endpoint: str, file: Path, parallel: int) -> dict[str, Any]:
    env = {**os.environ, "NODE_PATH": str(node_modules)}
    run = await asyncio.to_thread(
        subprocess.run,
        ["node", str(SCRIPT), endpoint, str(file), str(parallel), "admin", "tusjs", "auto"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def _zip_of(paths: list[Path]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in paths:
            zf.write(path, f"study/{path.name}")
    return buf.getvalue()


async def test_tus_js_client_uploads_and_parallel_uploads_are_refused_whole(
    make_config: Callable[..., Config],
    make_gateway: Callable[[Config], Any],
    tus_js_client: Path,
    tmp_path: Path,
) -> None:
    """One upload imports the zip; parallelUploads (tus concatenation, not advertised) is
    refused at its first request, and nothing of it is stored or imported."""
    gw = await make_gateway(make_config())
    base = f"http://127.0.0.1:{gw.http_port}"
    archive = tmp_path / "study.zip"
    archive.write_bytes(_zip_of(make_ct_series(tmp_path / "ct", 6, rows=128)))

    refused = await _tus(tus_js_client, f"{base}/api/uploads/tus", archive, parallel=2)
    assert refused["ok"] is False and refused["status"] == 400, refused
    assert "Upload-Concat" in refused["body"]
    async with aiohttp.ClientSession(base) as http:
        async with http.get("/api/uploads") as response:
            assert (await response.json())["items"] == []
        async with http.get("/api/projects/admin/datasets") as response:
            assert (await response.json())["items"] == []

    done = await _tus(tus_js_client, f"{base}/api/uploads/tus", archive, parallel=1)
    assert done["ok"] is True, done
    upload_id = done["url"].rsplit("/", 1)[-1]
    async with aiohttp.ClientSession(base) as http:
        for _ in range(600):  # the import follows the last PATCH; up to 30 s
            async with http.get(f"/api/uploads/{upload_id}") as response:
                status = await response.json()
            if status["state"] in ("done", "failed"):
                break
            await asyncio.sleep(0.05)
    assert status["state"] == "done" and status["instances_imported"] == 6, status
