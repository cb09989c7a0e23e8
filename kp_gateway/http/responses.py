"""HTTP responses shared by the API modules: the JSON error body and object downloads.

Handlers run on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from kp_gateway.backends.base import StorageBackend


def json_error(status: int, code: str, detail: str, **headers: str) -> web.Response:
    """The JSON error body of CONTRACT section 4: ``{"error": code, "detail": text}``."""
    return web.json_response({"error": code, "detail": detail}, status=status, headers=headers)


async def stream_object(
    request: web.Request, storage: StorageBackend, key: str, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Send one stored object: sendfile for a local file, else streamed in chunks.

    Memory stays flat whatever the object's size; a missing object is a JSON 404.
    """
    local = storage.local_path(key)
    if local is not None:
        if not local.is_file():
            return json_error(404, "not_found", f"no object {key}")
        # sendfile: the bytes never pass through Python.
        return web.FileResponse(local, headers=dict(headers))
    size = await storage.size(key)
    if size is None:
        return json_error(404, "not_found", f"no object {key}")
    response = web.StreamResponse(headers={**headers, "Content-Length": str(size)})
    await response.prepare(request)
    async for chunk in storage.read_chunks(key):
        await response.write(chunk)
    await response.write_eof()
    return response


_READ_ERRORS = (ConnectionError, HttpProcessingError, asyncio.IncompleteReadError)
BodyRead = Callable[[int], Awaitable[bytes]]


def timed_body_read(read: BodyRead, idle_s: float) -> BodyRead:
    """`read`, with aiohttp's errors for a body cut off turned into ConnectionError, and a
    sender silent for `idle_s` (``http.body_timeout_s``) treated as gone: it would hold its
    connection and upload slot forever."""

    async def reading(n: int) -> bytes:
        try:
            async with asyncio.timeout(idle_s):
                return await read(n)
        except TimeoutError:
            raise ConnectionResetError(f"no data for {idle_s:g} s") from None
        except _READ_ERRORS as exc:
            raise ConnectionResetError(str(exc) or type(exc).__name__) from exc

    return reading
