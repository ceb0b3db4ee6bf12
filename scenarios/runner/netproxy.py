"""A TCP proxy in front of the controller's listener, one per other host of a pool.

Why: this kernel has no netem and no iptables, so network faults between hosts are made where
the harness owns both ends. With ``RankPool(..., proxy_hosts=True)`` every other host's workers
reach the controller (their job, result and diagnosis connections) through that host's proxy,
and the nemesis (``net_latency``, ``net_drop``) delays or drops that host's traffic there.

What it does NOT reach, said wherever these faults are asked for (:data:`REACH`): gloo's pair
connections (the collectives themselves go directly between the addresses the ranks publish)
and torchrun's rendezvous store (the agents are told its address on their own command line).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time

#: one line: which traffic the network faults reach here, and which they cannot
REACH = ("net_latency / net_drop act on one host's job, result and diagnosis connections to "
         "the controller (a TCP proxy per host); gloo's collectives between hosts and the "
         "rendezvous store are not reached here (no netem or iptables on this kernel)")

_CHUNK = 65536


class _Pipe(threading.Thread):
    """One direction of one connection: read chunks, forward each `delay_s` after it came."""

    def __init__(self, proxy: TcpProxy, src: socket.socket, dst: socket.socket) -> None:
        super().__init__(name="cpcheck-netproxy-pipe", daemon=True)
        self.proxy, self.src, self.dst = proxy, src, dst
        self._due: list[tuple[float, int, bytes]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._eof = False
        self._sender = threading.Thread(target=self._send, name="cpcheck-netproxy-send",
                                        daemon=True)

    def run(self) -> None:
        self._sender.start()
        try:
            while True:
                data = self.src.recv(_CHUNK)
                if not data:
                    break
                with self._cv:
                    at = time.monotonic() + self.proxy.delay_s
                    heapq.heappush(self._due, (at, next(self._seq), data))
                    self._cv.notify()
        except OSError:
            pass
        with self._cv:
            self._eof = True
            self._cv.notify()

    def _send(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._due and not self._eof:
                        self._cv.wait()
                    if not self._due:
                        break
                    at, _, data = self._due[0]
                    wait = at - time.monotonic()
                    if wait > 0:
                        self._cv.wait(wait)
                        continue
                    heapq.heappop(self._due)
                self.dst.sendall(data)  # in arrival order: a later chunk is due no sooner
        except OSError:
            pass
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)


class TcpProxy:
    """Forwards connections made to :attr:`address` to `upstream`; :attr:`delay_s` is added
    to every chunk each way; :meth:`drop` cuts every live connection (both ends see EOF)."""

    def __init__(self, upstream: tuple[str, int], bind: str = "127.0.0.1",
                 name: str = "") -> None:
        self.upstream = upstream
        self.name = name
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._closing = False
        self._sock = socket.create_server((bind, 0), backlog=128)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept, name="cpcheck-netproxy",
                                        daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=10.0)
                up.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closing:
                    client.close()
                    up.close()
                    return
                self._conns.append((client, up))
            _Pipe(self, client, up).start()
            _Pipe(self, up, client).start()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def drop(self) -> int:
        """Cut every connection now; how many were cut."""
        with self._lock:
            conns, self._conns = self._conns, []
        for pair in conns:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        return len(conns)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5.0)
        self.drop()
