"""`ggspec serve`: an OpenAI-compatible HTTP API with speculation stats, and a chat page.

    app = create_app(engine, Settings(sampling, spec, max_tokens))
    serve(app, listen("127.0.0.1", 8080))
"""

from __future__ import annotations

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


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve until Ctrl-C (or SIGTERM): requests still streaming get 5 s to finish. Logs,
    the access log included, go to stderr."""
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config = uvicorn.Config(app, timeout_graceful_shutdown=5, log_config=log_config)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it stopped on again
        pass
