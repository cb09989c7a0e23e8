"""HTTP responses shared by the API modules: the JSON error body and object downloads.

Handlers run on the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

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
