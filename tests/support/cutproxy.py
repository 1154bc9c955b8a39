"""A TCP proxy on loopback that drops each connection after it has relayed N bytes downstream."""

from __future__ import annotations

import socket
import threading


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; cuts a connection after ``cut_after`` response bytes.

    Only the first ``cuts`` connections are cut (None: all of them).
    """

    def __init__(self, upstream: tuple[str, int], cut_after: int, cuts: int | None = None):
        self.upstream, self.cut_after, self.cuts_left = upstream, cut_after, cuts
        self.cuts_made = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _should_cut(self) -> bool:
        with self._lock:
            if self.cuts_left is None:
                return True
            if self.cuts_left > 0:
                self.cuts_left -= 1
                return True
            return False

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            limit = self.cut_after if self._should_cut() else None
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    with self._lock:
                        self.cuts_made += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._stop = True
        self._server.close()
