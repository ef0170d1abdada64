"""A loopback HTTP server written by hand, for what a good server never does (trickling
bodies, cut-off bodies, gzip labels on plain files): tests/test_download.py and
tests/test_bounds.py."""

from __future__ import annotations

import socket
import threading


class RawServer:
    """HTTP by hand, for what a good server never does: `head` and `body` sent as they are,
    then (`trickle`) one more byte every `trickle` s until closed. The request headers each
    connection sent are kept."""

    def __init__(self, head: str, body: bytes, *, trickle: float | None = None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply = head.replace("\n", "\r\n").encode() + b"\r\n" + body
        self.trickle = trickle
        self.requests: list[str] = []
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            self.requests.append(conn.recv(65536).decode("latin-1").lower())
            conn.sendall(self.reply)
            while self.trickle and not self.stop.wait(self.trickle):
                conn.sendall(b" ")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
