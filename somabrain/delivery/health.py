"""The publisher's HTTP endpoints: `/metrics`, `/healthz` and `/readyz`.

Served by the standard library's WSGI server in a daemon thread (the same server
prometheus_client uses), with prometheus_client's WSGI app for `/metrics`.

- `/healthz` answers 200 while the drain loop thread is alive: a stuck or dead loop
  makes the kubelet restart the pod.
- `/readyz` answers 200 while this process is the tenant's active publisher (it holds
  the lock and has a session with Kafka), 503 while it waits as standby or reconnects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from somabrain.delivery import metrics


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds are not news; say nothing."""


def serve(*, port: int, live: Callable[[], bool], ready: Callable[[], bool]) -> WSGIServer:
    """Start serving on 0.0.0.0:`port` in a daemon thread; return the server."""
    metrics_app = make_wsgi_app(metrics.REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path in ("/healthz", "/readyz"):
            ok = live() if path == "/healthz" else ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    server = make_server("0.0.0.0", port, app, handler_class=_QuietHandler)  # noqa: S104 - pods are probed and scraped on their IP
    threading.Thread(target=server.serve_forever, name="somabrain-http", daemon=True).start()
    return server
