"""A TCP proxy whose connections can be made to go silent without closing.

`SilentProxy(target)` listens on 127.0.0.1 and forwards every connection to `target`,
byte for byte (TLS passes through untouched). `silence_existing()` turns every open
connection into a black hole: it stays open, whatever either side sends is read and
dropped, and neither side learns that the other one closed. That is what a client sees
of a half-closed connection, or of a network path that stopped carrying packets.
`silence_new(True)` treats connections accepted from then on the same way: never
forwarded at all. After `silence_new(False)` new connections are forwarded again;
silenced ones stay silent until their client closes them.

Standard library only, one thread per direction of each connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

_CHUNK = 65536


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.silent = upstream is None

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class SilentProxy:
    """Forwards 127.0.0.1:`port` to `target` until told to go silent."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._silence_new = False
        self.accepted = 0
        threading.Thread(target=self._accept, name="silent-proxy", daemon=True).start()

    def __enter__(self) -> SilentProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def silence_existing(self) -> int:
        """Make every open connection silent; return how many there were."""
        with self._lock:
            for connection in self._connections:
                connection.silent = True
            return len(self._connections)

    def silence_new(self, silent: bool) -> None:
        """Whether connections accepted from now on are silent from the start."""
        with self._lock:
            self._silence_new = silent

    def close(self) -> None:
        """Stop listening and close every connection (silent ones included)."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                silent = self._silence_new
                self.accepted += 1
            upstream = None
            if not silent:
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
            connection = _Connection(client, upstream)
            with self._lock:
                self._connections.append(connection)
            self._pump(connection, client, upstream)
            if upstream is not None:
                self._pump(connection, upstream, client)

    def _pump(
        self, connection: _Connection, source: socket.socket, sink: socket.socket | None
    ) -> None:
        def run() -> None:
            while True:
                try:
                    data = source.recv(_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                if connection.silent or sink is None:
                    continue
                try:
                    sink.sendall(data)
                except OSError:
                    break
            # The client gone ends the connection. The server gone ends it only while it
            # is forwarded: a silent connection keeps its client waiting for ever.
            if source is connection.client or not connection.silent:
                self._forget(connection)
            else:
                with contextlib.suppress(OSError):
                    source.close()

        threading.Thread(target=run, name="silent-proxy-pump", daemon=True).start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            if connection in self._connections:
                self._connections.remove(connection)
        connection.close()
