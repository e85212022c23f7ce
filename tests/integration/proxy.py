"""A TCP forwarding proxy for fault tests: ``freeze()`` stops forwarding without closing any
socket, the way a dead host or a cut link behind a NAT looks to both ends."""

from __future__ import annotations

import select
import socket
import threading


class FreezableProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            t = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self.stopped.is_set():
            if self.frozen.is_set():
                self.stopped.wait(0.05)  # hold everything: no reads, no writes, no close
                continue
            readable, _, _ = select.select([a, b], [], [], 0.05)
            for s in readable:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    for x in (a, b):
                        x.close()
                    return
                peers[s].sendall(data)

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        for t in self.threads:
            t.join(timeout=5)
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
