"""S3-compatible object storage through one aiobotocore client for the app's lifetime.

Keys are exactly those of the filesystem backend (CONTRACT section 7), in one bucket. Only
standard S3 calls are made (HEAD/GET/PUT object, multipart upload, ListObjectsV2, HEAD/PUT
bucket), so AWS, Ceph RGW, SeaweedFS, Garage and MinIO all serve it; nothing depends on one of
them. Credentials come only from the standard AWS chain (environment, shared files, instance
role), never from the gateway's configuration.

Durability: an object is stored when its PUT (or CompleteMultipartUpload) returned 200; every
request body carries Content-MD5, so the server rejects a body damaged on the way. Until then
the acknowledged instance stays fsynced in the local spool (see ``pipeline.spool``), so an S3
outage delays storing but never loses an acknowledged instance.

Every method runs on the event loop; file reads and writes go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from kp_gateway.errors import (
    BackendError,
    BackendRejectedError,
    BackendUnavailableError,
    ObjectNotFoundError,
)

logger = logging.getLogger(__name__)

MiB = 1 << 20
# S3's limits: parts of at least 5 MiB (but the last), at most 10,000 parts per upload.
MIN_PART_BYTES = 5 * MiB
MAX_PARTS = 10_000
# One part is in memory per running upload, so this bounds memory per store worker.
DEFAULT_PART_BYTES = 8 * MiB

# Error codes that mean "try again later" whatever their HTTP status (AWS S3 error reference).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "OperationAborted",
    }
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_CONTENT_TYPES = {
    ".dcm": "application/dicom",
    ".png": "image/png",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
}


def _error_code(exc: ClientError) -> tuple[str, int]:
    response: dict[str, Any] = exc.response or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def translate_error(exc: BaseException, what: str) -> BackendError:
    """Map a botocore/aiohttp exception to the gateway's backend errors. Pure.

    Connection failures, timeouts, 5xx, 408/429 and throttling codes (SlowDown, ...) are
    transient (:class:`BackendUnavailableError`); authentication, a missing bucket and other
    4xx answers, missing credentials and invalid parameters are permanent
    (:class:`BackendRejectedError`).
    """
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        label = code if code and code != str(status) else ""
        detail = f"{what}: S3 answered {status or '?'} {label or type(exc).__name__}".rstrip()
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return BackendUnavailableError(detail)
        return BackendRejectedError(detail)
    if isinstance(exc, BotoCoreError):
        # ConnectionError, HTTPClientError and their timeouts; the rest (credentials,
        # parameters) cannot get better by retrying.
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return BackendUnavailableError(f"{what}: {exc}")
        return BackendRejectedError(f"{what}: {exc}")
    if isinstance(exc, aiohttp.ClientError | TimeoutError | OSError):
        return BackendUnavailableError(f"{what}: {type(exc).__name__}: {exc}")
    return BackendRejectedError(f"{what}: {type(exc).__name__}: {exc}")


_EDGE_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError, OSError)


@contextlib.contextmanager
def _edge(what: str) -> Iterator[None]:
    """Translate third-party exceptions raised inside the block (``raise ... from exc``)."""
    try:
        yield
    except _EDGE_ERRORS as exc:
        raise translate_error(exc, what) from exc


def _is_missing(exc: ClientError) -> bool:
    code, status = _error_code(exc)
    return code in _MISSING_CODES or (status == 404 and code != "NoSuchBucket")


def _md5_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def part_size_for(size: int, preferred: int = DEFAULT_PART_BYTES) -> int:
    """Part size for a multipart upload of `size` bytes: `preferred`, raised in whole MiB
    just enough to stay within S3's 10,000 parts. Pure."""
    part = max(MIN_PART_BYTES, preferred)
    if size > part * MAX_PARTS:
        part = -(-size // MAX_PARTS)
        part = -(-part // MiB) * MiB
    return part


def _read_range(path: Path, offset: int, length: int) -> bytes:
    """Blocking; call via asyncio.to_thread."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


class S3Storage:
    """Objects in one S3 bucket under the keys of CONTRACT section 7.

    Parameters
    ----------
    bucket : str
        The bucket holding every object.
    endpoint_url : str
        Empty for AWS; otherwise the S3 endpoint (``https://s3.lab:9000``).
    region : str
        Region used for signing (and for creating the bucket on AWS).
    path_style : bool
        Path-style addressing (``endpoint/bucket/key``), which most self-hosted stores need.
    verify_tls : bool
        Verify the endpoint's certificate (on by default; turn off only for a test endpoint).
    create_bucket : bool
        Create the bucket in :meth:`open` when it does not exist.
    multipart_threshold_bytes : int
        Files at least this large are uploaded in parts of :func:`part_size_for` bytes.
    timeout_s : float
        Connect and read timeout per request.
    max_connections : int
        Size of the client's connection pool (store workers plus concurrent downloads).
    """

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str = "",
        region: str = "us-east-1",
        path_style: bool = True,
        verify_tls: bool = True,
        create_bucket: bool = False,
        multipart_threshold_bytes: int = 64 * MiB,
        timeout_s: float = 30.0,
        max_connections: int = 32,
        part_bytes: int = DEFAULT_PART_BYTES,
    ) -> None:
        self.bucket = bucket
        self._endpoint_url = endpoint_url or None
        self._region = region
        self._path_style = path_style
        self._verify_tls = verify_tls
        self._create_bucket = create_bucket
        self._threshold = max(MIN_PART_BYTES, multipart_threshold_bytes)
        self._part_bytes = part_bytes
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the client, check the bucket and create it when configured to.

        Raises
        ------
        BackendUnavailableError
            The endpoint cannot be reached.
        BackendRejectedError
            The bucket does not exist (and may not be created) or access is denied.
        """
        config = AioConfig(
            region_name=self._region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if self._path_style else "auto"},
            connect_timeout=self._timeout_s,
            read_timeout=self._timeout_s,
            max_pool_connections=self._max_connections,
            # A few fast retries for blips; longer outages are the pipeline's retries' job.
            retries={"mode": "standard", "total_max_attempts": 3},
            # Content-MD5 is what every S3 implementation checks; the newer CRC trailers are
            # not understood by all of them, so only send them where an API requires one.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = contextlib.AsyncExitStack()
        session = get_session()
        self._client = await stack.enter_async_context(
            session.create_client(
                "s3", endpoint_url=self._endpoint_url, verify=self._verify_tls, config=config
            )
        )
        self._stack = stack
        try:
            await self._ensure_bucket()
        except BaseException:
            await self.aclose()
            raise

    async def _ensure_bucket(self) -> None:
        what = f"checking bucket {self.bucket!r}"
        try:
            await self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            code, status = _error_code(exc)
            if not (status == 404 or code in ("404", "NoSuchBucket", "NotFound")):
                raise translate_error(exc, what) from exc
            if not self._create_bucket:
                raise BackendRejectedError(
                    f"S3 bucket {self.bucket!r} does not exist (set storage.s3_create_bucket "
                    "= true to create it at start)"
                ) from exc
        except _EDGE_ERRORS as exc:
            raise translate_error(exc, what) from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self._region and self._region != "us-east-1":
            # us-east-1 is the one region that refuses an explicit LocationConstraint.
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            await self._client.create_bucket(**kwargs)
            logger.info("created S3 bucket %s", self.bucket)
        except ClientError as exc:
            # Another gateway sharing the bucket may have won the race.
            if _error_code(exc)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise translate_error(exc, f"creating bucket {self.bucket!r}") from exc
        except _EDGE_ERRORS as exc:
            raise translate_error(exc, f"creating bucket {self.bucket!r}") from exc

    async def aclose(self) -> None:
        """Close the client and its connection pool."""
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    def _require_client(self) -> Any:
        if self._client is None:
            raise BackendUnavailableError("S3 storage is not open")
        return self._client

    # -- writes ---------------------------------------------------------------------------

    @staticmethod
    def _content_type(key: str) -> str:
        return _CONTENT_TYPES.get(os.path.splitext(key)[1].lower(), "application/octet-stream")

    async def put_file(self, key: str, src: Path) -> int:
        """Upload the file `src` as `key`; in parts at/above the multipart threshold.

        `src` stays in place (the caller deletes the spool copy once indexed). Returns the
        size. Raises BackendUnavailableError / BackendRejectedError.
        """
        try:
            size = (await asyncio.to_thread(src.stat)).st_size
        except OSError as exc:
            raise BackendRejectedError(f"storing {key}: cannot read {src}: {exc}") from exc
        if size < self._threshold:
            with _edge(f"storing {key}: reading {src}"):
                data = await asyncio.to_thread(src.read_bytes)
            await self.put_bytes(key, data)
            return len(data)
        await self._put_multipart(key, src, size)
        return size

    async def _put_multipart(self, key: str, src: Path, size: int) -> None:
        client = self._require_client()
        part_bytes = part_size_for(size, self._part_bytes)
        with _edge(f"starting multipart upload of {key}"):
            started = await client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=self._content_type(key)
            )
        upload_id = started["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, part_bytes), start=1):
                with _edge(f"storing {key}: reading {src}"):
                    data = await asyncio.to_thread(_read_range, src, offset, part_bytes)
                md5 = await asyncio.to_thread(_md5_b64, data)
                with _edge(f"uploading part {number} of {key}"):
                    answer = await client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                        ContentMD5=md5,
                    )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            with _edge(f"completing multipart upload of {key}"):
                await client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            # Shielded: a cancelled upload must not leave its parts billed in the bucket.
            await asyncio.shield(self._abort(key, upload_id))
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._require_client().abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except (*_EDGE_ERRORS, BackendError):
            # The bucket's lifecycle rule for incomplete uploads is the fallback.
            logger.warning("could not abort multipart upload of %s", key, exc_info=True)

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[int]:
        """Upload several spool files concurrently (bounded by the batch). Runs on the loop."""
        return list(await asyncio.gather(*(self.put_file(key, src) for key, src in items)))

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key` in one PUT with Content-MD5."""
        client = self._require_client()
        md5 = _md5_b64(data) if len(data) < MiB else await asyncio.to_thread(_md5_b64, data)
        with _edge(f"storing {key}"):
            await client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentMD5=md5,
                ContentType=self._content_type(key),
            )

    # -- reads ----------------------------------------------------------------------------

    async def size(self, key: str) -> int | None:
        """The object's size from a HEAD request, or None when it does not exist."""
        client = self._require_client()
        with _edge(f"reading {key}"):
            try:
                head = await client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise
        return int(head["ContentLength"])

    async def _get(self, key: str) -> Any:
        client = self._require_client()
        with _edge(f"reading {key}"):
            try:
                return await client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_missing(exc):
                    raise ObjectNotFoundError(f"no object {key} in bucket {self.bucket!r}") from exc
                raise

    async def read_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream the object in chunks of at most `chunk_bytes`; never holds it whole.

        Raises ObjectNotFoundError when it does not exist, BackendError when the transfer fails.
        """
        response = await self._get(key)
        body = response["Body"]
        try:
            while True:
                with _edge(f"reading {key}"):
                    chunk = await body.read(chunk_bytes)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    async def fetch_to_file(self, key: str, dest: Path) -> None:
        """Download the object into the file `dest` (created or replaced), streaming.

        Raises ObjectNotFoundError when it does not exist; a partial `dest` is removed on
        failure.
        """
        what = f"fetching {key} to {dest}"
        with _edge(what):
            fh = await asyncio.to_thread(open, dest, "wb")
        try:
            async for chunk in self.read_chunks(key):
                with _edge(what):
                    await asyncio.to_thread(fh.write, chunk)
        except BaseException:
            fh.close()
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise
        else:
            with _edge(what):
                await asyncio.to_thread(fh.close)

    async def iter_keys(self, prefix: str = "", start_after: str = "") -> AsyncIterator[str]:
        """Every key starting with `prefix` and sorting after `start_after`, in sorted order.

        S3 lists in UTF-8 byte order, which for str is the same as Python's ordering.
        """
        client = self._require_client()
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            kwargs["StartAfter"] = start_after
        pages = client.get_paginator("list_objects_v2").paginate(**kwargs).__aiter__()
        while True:
            with _edge(f"listing {prefix!r}"):
                try:
                    page = await pages.__anext__()
                except StopAsyncIteration:
                    return
            for item in page.get("Contents", ()):
                yield str(item["Key"])

    def local_path(self, key: str) -> Path | None:
        """Always None: objects live in the bucket (HTTP streams them with read_chunks)."""
        return None

    async def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (S3 semantics)."""
        client = self._require_client()
        with _edge(f"deleting {key}"):
            await client.delete_object(Bucket=self.bucket, Key=key)

    async def free_bytes(self) -> int | None:
        """None: an object store has no free-space figure."""
        return None

    async def ping(self) -> None:
        """HEAD the bucket; raises BackendUnavailableError / BackendRejectedError."""
        with _edge(f"checking bucket {self.bucket!r}"):
            await self._require_client().head_bucket(Bucket=self.bucket)


__all__ = ["S3Storage", "part_size_for", "translate_error"]
