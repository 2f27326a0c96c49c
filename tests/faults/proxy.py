"""A TCP proxy in front of a real server (PostgreSQL, Redis) that a test can take down or freeze.

PostgreSQL and Redis are never faked; to see what opsbot does when one of them disappears or stops
answering mid-request, the test points opsbot at this proxy instead and flips it:

* ``down()``: existing connections are cut and new ones are closed at once (a crashed server,
  a network partition with resets);
* ``pause()``: connections stay open but no byte goes through in either direction (a server
  stopped with SIGSTOP, a black-holed network); new connections are accepted and hang;
* ``up()``: traffic flows again.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host, self.target_port = target_host, target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @classmethod
    async def for_url(cls, url: str) -> tuple[TcpProxy, str]:
        """A started proxy for the server of ``url``, and the same URL pointing at the proxy."""
        parts = urlsplit(url)
        proxy = await cls(parts.hostname or "127.0.0.1", parts.port or 0).start()
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{proxy.port}"
        return proxy, urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._cut()
        if self._server:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def down(self) -> None:
        self._down = True
        self._flowing.set()
        self._cut()

    def pause(self) -> None:
        self._down = False
        self._flowing.clear()

    def up(self) -> None:
        self._down = False
        self._flowing.set()

    def _cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            await self._flowing.wait()
            if self._down:
                break
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(Exception):
            writer.write_eof()
