"""Request bodies, bounded before any route sees them.

An ASGI middleware (not an ``@app.middleware("http")`` function, which only sees headers): JSON routes
take at most ``limit`` bytes, counted while the body streams in, so a chunked body with no
Content-Length is cut off at the limit too (413) instead of being buffered whole. A /v1 request that
carries no bearer API key gets an empty body: it will be refused (401) by its route's role check, and
its body is never read at all. Uploads (``/v1/ingest/``, and the console's ``/ui/admin/upload/``)
stream to disk in their route, under their own limit, after the role check.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privseg.api.deps import scope_bearer_token, scope_header

# Streamed to disk by their routes, after the role check, under the upload limit: the API's and the
# console's (an admin's browser upload).
UPLOAD_PREFIXES = ("/v1/ingest/", "/ui/admin/upload/")


def _problem_bytes(status: int, code: str, title: str, detail: str) -> bytes:
    doc = {"type": f"https://privseg.dev/problems/{code}", "title": title, "status": status, "detail": detail}
    return json.dumps(doc).encode()


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _too_large(self, send: Send) -> None:
        body = _problem_bytes(
            413, "body-too-large", "Body too large", f"request bodies are limited to {self.limit} bytes"
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        token = scope_bearer_token(scope)
        if path.startswith("/v1") and token is None:
            await self.app(scope, replayed(b"", receive), send)  # refused by the role check
            return
        if path.startswith(UPLOAD_PREFIXES):
            await self.app(scope, receive, send)
            return
        length = scope_header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._too_large(send)
            return
        # Read the body here, counting, then replay it: never more than limit + one chunk in memory.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replayed(b"".join(chunks), receive), send)


def replayed(body: bytes, receive: Receive) -> Receive:
    """``body`` as the request's one body message; later calls (a wait for the disconnect) go to the
    server."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
