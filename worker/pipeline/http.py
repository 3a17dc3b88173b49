"""`/healthz`, `/readyz` and `/metrics` on stdlib http.server, in a daemon thread (no dependency).

- `/healthz`: 200 while the consumer loop turned recently (it turns every poll, a fraction of a second), 503 when
  it is stuck: a liveness probe restarts the worker.
- `/readyz`: 200 when the model is loaded and partitions are assigned, else 503. A worker of a group with more
  members than partitions stays unready: that is expected (KEDA's `allowIdleConsumers`).
- `/metrics`: Prometheus text format 0.0.4, or OpenMetrics when the scraper's Accept header asks for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        alive: Callable[[], bool],
        ready: Callable[[], bool],
        metrics: Callable[[str | None], tuple[bytes, str]],
    ) -> None:
        """`metrics(accept)`: the scrape's body and content type for the request's Accept header."""
        routes: dict[str, Callable[[str | None], tuple[int, bytes, str]]] = {
            "/healthz": lambda _: (200, b"ok\n", "text/plain") if alive() else (503, b"stuck\n", "text/plain"),
            "/readyz": lambda _: (200, b"ready\n", "text/plain") if ready() else (503, b"not ready\n", "text/plain"),
            "/metrics": lambda accept: (200, *metrics(accept)),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                accept = self.headers.get("Accept")
                status, data, content_type = route(accept) if route else (404, b"not found\n", "text/plain")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth a line
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="rerank-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
