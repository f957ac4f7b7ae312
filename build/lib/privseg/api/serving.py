"""Running the app under uvicorn: one process, or a supervisor and N worker processes."""

from __future__ import annotations

import socket
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from privseg.api.app import anchor_writer, create_app
from privseg.deployment import Deployment


class _TcpConfig(uvicorn.Config):
    """uvicorn binds the listener of a multi-process server with ``proto`` 0; the connections it
    accepts inherit that, asyncio then never sets TCP_NODELAY on them, and every keep-alive response
    waits ~40 ms for the client's delayed ACK (measured here: /healthz 47.7 ms with two workers, 2.7 ms
    with one; uvicorn issue #3149). Mark the listener as TCP so accepted sockets are."""

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
        return sock


def serve(dep: Deployment, *, host: str, port: int, workers: int) -> None:
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        "timeout_graceful_shutdown": 30,
    }
    if workers == 1:
        uvicorn.run(create_app(dep), **options)
        return
    # Several processes: each builds its app from the same environment; the anchors are written once,
    # from the supervisor.
    config = _TcpConfig("privseg.api.app:worker_app", factory=True, workers=workers, **options)
    writer = anchor_writer(dep)
    if writer is not None:
        writer.start()
    try:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    finally:
        if writer is not None:
            writer.stop()
