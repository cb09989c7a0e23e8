"""One contract for every StorageBackend: FsStorage always, S3Storage against moto's server."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kp_gateway.backends.base import StorageBackend
from kp_gateway.backends.fs import FsStorage
from kp_gateway.backends.s3 import S3Storage
from kp_gateway.errors import BackendRejectedError, BackendUnavailableError, ObjectNotFoundError
from tests.s3_support import MotoS3, unique_bucket
from tests.s3_support import isolated_aws_env as isolated_aws_env

MiB = 1 << 20


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's standalone S3 server on an OS-assigned loopback port, for the whole session."""
    server = MotoS3().start()
    yield server
    server.stop()


def make_s3(endpoint: str, bucket: str, **kw: object) -> S3Storage:
    options: dict[str, object] = {
        "create_bucket": True,
        "multipart_threshold_bytes": 5 * MiB,
        "timeout_s": 5.0,
    }
    options.update(kw)
    return S3Storage(bucket=bucket, endpoint_url=endpoint, **options)  # type: ignore[arg-type]


@pytest.fixture(params=["fs", "s3"])
async def storage(
    request: pytest.FixtureRequest, tmp_path: Path, moto_s3: MotoS3
) -> AsyncIterator[StorageBackend]:
    """An opened backend of each kind; the S3 one in its own fresh bucket."""
    backend: StorageBackend
    if request.param == "fs":
        backend = FsStorage(tmp_path / "objects")
    else:
        backend = make_s3(moto_s3.url, unique_bucket("contract"))
    await backend.open()
    try:
        yield backend
    finally:
        await backend.aclose()


async def read_all(storage: StorageBackend, key: str, chunk_bytes: int = 1 << 20) -> bytes:
    chunks = [chunk async for chunk in storage.read_chunks(key, chunk_bytes)]
    assert all(len(c) <= chunk_bytes for c in chunks), "a chunk exceeded chunk_bytes"
    return b"".join(chunks)


async def keys(storage: StorageBackend, prefix: str = "", start_after: str = "") -> list[str]:
    return [key async for key in storage.iter_keys(prefix, start_after)]


async def test_storage_put_file_round_trip(storage: StorageBackend, tmp_path: Path) -> None:
    """put_file, size, read_chunks and fetch_to_file all see the same bytes; src stays."""
    src = tmp_path / "src.dcm"
    data = os.urandom(300_000)
    src.write_bytes(data)
    key = "dicom/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    assert await storage.put_file(key, src) == len(data)
    assert src.read_bytes() == data
    assert await storage.size(key) == len(data)
    assert await read_all(storage, key, 64 * 1024) == data
    dest = tmp_path / "fetched.dcm"
    await storage.fetch_to_file(key, dest)
    assert dest.read_bytes() == data
    local = storage.local_path(key)
    if isinstance(storage, S3Storage):
        assert local is None
    else:
        assert local is not None and local.read_bytes() == data


async def test_storage_put_bytes_replaces(storage: StorageBackend) -> None:
    """put_bytes stores and a second put under the same key replaces the object."""
    await storage.put_bytes("thumbnails/1.2.3.png", b"first")
    await storage.put_bytes("thumbnails/1.2.3.png", b"second, longer")
    assert await read_all(storage, "thumbnails/1.2.3.png") == b"second, longer"
    assert await storage.size("thumbnails/1.2.3.png") == len(b"second, longer")


async def test_storage_empty_object(storage: StorageBackend) -> None:
    """A zero-byte object round-trips."""
    await storage.put_bytes("uploads/u1/empty.txt", b"")
    assert await storage.size("uploads/u1/empty.txt") == 0
    assert await read_all(storage, "uploads/u1/empty.txt") == b""


async def test_storage_multipart_object_byte_identical(
    storage: StorageBackend, tmp_path: Path, moto_s3: MotoS3
) -> None:
    """A 12 MiB object over the 5 MiB threshold is uploaded in parts and reads back identical."""
    src = tmp_path / "large.dcm"
    data = os.urandom(12 * MiB)
    src.write_bytes(data)
    key = "dicom/1.2/1.2.3/1.2.3.4.dcm"
    assert await storage.put_file(key, src) == len(data)
    assert await storage.size(key) == len(data)
    digest = hashlib.sha256()
    async for chunk in storage.read_chunks(key, MiB):
        assert len(chunk) <= MiB
        digest.update(chunk)
    assert digest.digest() == hashlib.sha256(data).digest()
    if isinstance(storage, S3Storage):
        client = moto_s3.client()
        head = client.head_object(Bucket=storage.bucket, Key=key)
        assert head["ETag"].strip('"').endswith("-2"), "not a two-part multipart upload"
        assert client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", []) == []


async def test_s3_cancelled_multipart_upload_is_aborted(tmp_path: Path, moto_s3: MotoS3) -> None:
    """Cancelling put_file mid-upload aborts the multipart upload: no parts, no object."""
    storage = make_s3(moto_s3.url, unique_bucket("abort"))
    await storage.open()
    client = moto_s3.client()
    try:
        src = tmp_path / "large.dcm"
        src.write_bytes(os.urandom(40 * MiB))
        task = asyncio.create_task(storage.put_file("dicom/a/b/c.dcm", src))
        for _ in range(400):
            uploads = await asyncio.to_thread(client.list_multipart_uploads, Bucket=storage.bucket)
            if uploads.get("Uploads") or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done(), "the upload finished before it could be cancelled"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        uploads = client.list_multipart_uploads(Bucket=storage.bucket)
        assert uploads.get("Uploads", []) == []
        assert await storage.size("dicom/a/b/c.dcm") is None
    finally:
        await storage.aclose()


async def test_storage_missing_key(storage: StorageBackend, tmp_path: Path) -> None:
    """A missing key: size None, read/fetch raise ObjectNotFoundError (no partial file), delete
    is quiet."""
    assert await storage.size("dicom/none/none/none.dcm") is None
    with pytest.raises(ObjectNotFoundError):
        await read_all(storage, "dicom/none/none/none.dcm")
    dest = tmp_path / "never.dcm"
    with pytest.raises(ObjectNotFoundError):
        await storage.fetch_to_file("dicom/none/none/none.dcm", dest)
    assert not dest.exists()
    await storage.delete("dicom/none/none/none.dcm")


async def test_storage_delete(storage: StorageBackend) -> None:
    """A deleted object is gone for size, read and listing."""
    await storage.put_bytes("validation/1.2.html", b"<html></html>")
    await storage.delete("validation/1.2.html")
    assert await storage.size("validation/1.2.html") is None
    assert await keys(storage, "validation/") == []


async def test_storage_iter_keys_sorted_and_resumable(storage: StorageBackend) -> None:
    """Keys come in str order (also across folder names that prefix each other), per prefix,
    and start_after resumes a listing."""
    wanted = [
        "dicom/1.2/1.2.5/9.dcm",
        "dicom/1.2.3/1.2.3.4/1.dcm",
        "dicom/1.2.3/1.2.3.4/10.dcm",
        "dicom/1.2.3/1.2.3.4/2.dcm",
        "dicom/1.23/1.23.1/1.dcm",
    ]
    for key in [*reversed(wanted), "routing/1.2.5/abc.json", "thumbnails/1.2.5.png"]:
        await storage.put_bytes(key, key.encode())
    listed = await keys(storage, "dicom/")
    assert listed == sorted(wanted)
    assert await keys(storage, "dicom/", start_after=listed[1]) == listed[2:]
    assert await keys(storage, "dicom/", start_after=listed[-1]) == []
    assert await keys(storage, "dicom/1.2.3/") == [
        k for k in listed if k.startswith("dicom/1.2.3/")
    ]
    assert await keys(storage, "routing/1.2.5/") == ["routing/1.2.5/abc.json"]
    assert await keys(storage, "nothing/") == []


async def test_storage_free_bytes(storage: StorageBackend) -> None:
    """The filesystem knows its free space; an object store does not."""
    free = await storage.free_bytes()
    if isinstance(storage, S3Storage):
        assert free is None
    else:
        assert isinstance(free, int) and free > 0


async def test_fs_rejects_unsafe_keys(tmp_path: Path) -> None:
    """A key escaping the root is refused before any file is touched."""
    storage = FsStorage(tmp_path / "objects")
    await storage.open()
    with pytest.raises(BackendRejectedError):
        await storage.put_bytes("../escape", b"x")


async def test_s3_missing_bucket_rejected(moto_s3: MotoS3) -> None:
    """A bucket that does not exist (and may not be created) is a permanent error at open."""
    storage = make_s3(moto_s3.url, unique_bucket("missing"), create_bucket=False)
    with pytest.raises(BackendRejectedError, match="does not exist") as caught:
        await storage.open()
    assert caught.value.__cause__ is not None


async def test_s3_deleted_bucket_rejected(moto_s3: MotoS3, tmp_path: Path) -> None:
    """Writing into a bucket that vanished after start is permanent (NoSuchBucket, 404)."""
    storage = make_s3(moto_s3.url, unique_bucket("vanish"))
    await storage.open()
    try:
        moto_s3.client().delete_bucket(Bucket=storage.bucket)
        with pytest.raises(BackendRejectedError, match="NoSuchBucket"):
            await storage.put_bytes("thumbnails/x.png", b"x")
        with pytest.raises(BackendRejectedError):
            await keys(storage, "dicom/")
    finally:
        await storage.aclose()


async def test_s3_stopped_server_unavailable(tmp_path: Path) -> None:
    """With the endpoint down every call is transient (BackendUnavailableError, chained)."""
    server = MotoS3().start()
    storage = make_s3(server.url, unique_bucket("down"))
    try:
        await storage.open()
        await storage.put_bytes("thumbnails/up.png", b"up")
        server.stop()
        with pytest.raises(BackendUnavailableError) as caught:
            await storage.put_bytes("thumbnails/down.png", b"down")
        assert caught.value.__cause__ is not None
        with pytest.raises(BackendUnavailableError):
            await storage.size("thumbnails/up.png")
        with pytest.raises(BackendUnavailableError):
            await read_all(storage, "thumbnails/up.png")
        server.start()
        assert await read_all(storage, "thumbnails/up.png") == b"up"
    finally:
        await storage.aclose()
        server.stop()


async def test_s3_unreachable_at_open_unavailable(tmp_path: Path) -> None:
    """An endpoint nobody listens on fails open() as transient, not as a config error."""
    server = MotoS3().start()
    url = server.url
    server.stop()
    storage = make_s3(url, unique_bucket("never"))
    with pytest.raises(BackendUnavailableError):
        await storage.open()
