"""`ggspec serve`: an OpenAI-compatible HTTP API with speculation stats, and a chat page.

    app = create_app(engine, Settings(sampling, spec, max_tokens))
    serve(app, listen("127.0.0.1", 8080))
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket

import uvicorn
from fastapi import FastAPI

from ..errors import GgspecError
from .app import create_app

__all__ = ["create_app", "listen", "serve"]


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); a clear error when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:  # (a name that does not resolve has getaddrinfo's negative errno)
        reason = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
        raise GgspecError(f"cannot listen on {host}:{port}: {reason}; "
                          "choose another --port (or --host)") from None


GRACE = 5  # seconds a running answer gets to finish when the server stops


class _Server(uvicorn.Server):
    """Stops the app's worker (ggspec.server.worker) as soon as shutting down begins:
    requests still waiting get a 503 at once and the running one ends with one after the
    grace period, where uvicorn would cancel them after it with a plain 500."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await asyncio.to_thread(self.config.app.state.worker.stop, GRACE - 1)
        await super().shutdown(sockets)


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve until Ctrl-C (or SIGTERM): waiting requests are answered 503 at once, the
    running one gets a few seconds to finish. Logs, the access log included, go to stderr."""
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config = uvicorn.Config(app, timeout_graceful_shutdown=GRACE, log_config=log_config)
    try:
        _Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it stopped on again
        pass
