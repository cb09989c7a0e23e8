"""moto's standalone S3 server on loopback, and an isolated AWS environment, for S3 tests.

Not a conftest: the S3 test modules define thin fixtures around these helpers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


class MotoS3:
    """A ``moto.server.ThreadedMotoServer`` on 127.0.0.1 that can be stopped and restarted.

    moto keeps its state in this process, not in the server, so buckets and objects survive a
    restart; what a restart takes away is the listening socket (connection refused meanwhile).
    """

    def __init__(self) -> None:
        self._server: Any = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        """Start on the port of the previous run, or on an OS-assigned one the first time."""
        import logging

        from moto.server import ThreadedMotoServer

        # One INFO line per request would bury the test's own output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        # Port 0 is resolved only once bound: read it back, nothing can take it in between.
        self.port = server.get_host_and_port()[1]
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket, so clients get connection refused."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        # ThreadedMotoServer.stop() leaves the socket bound; a restart on the port needs it gone.
        if server._server is not None:
            server._server.server_close()

    def client(self) -> Any:
        """A synchronous boto3 client for checks the gateway's API does not expose."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


def isolate_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop every AWS_* variable and point the config and credential files at empty ones.

    A developer's ~/.aws must not change results; dummy keys satisfy request signing
    (moto accepts any). Subprocesses inherit the patched environment.
    """
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = tmp_path / f"aws-{uuid.uuid4().hex}"
    empty.mkdir()
    (empty / "config").write_text("")
    (empty / "credentials").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # No instance-metadata probing when something is missing.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def unique_bucket(stem: str = "kp") -> str:
    """A fresh bucket name, so tests sharing one moto server never see each other's objects."""
    return f"{stem}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Autouse wherever imported: no developer ~/.aws or AWS_* variable leaks into a test."""
    isolate_aws_environment(monkeypatch, tmp_path)


@pytest.fixture
def moto_s3() -> Iterator[MotoS3]:
    """A moto server of this test's own (outage tests stop and restart it)."""
    server = MotoS3().start()
    yield server
    server.stop()
