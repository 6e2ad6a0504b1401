"""A forward HTTP proxy on a loopback port, for the tests of ``upstream.proxy`` and
``alerts.proxy``: it carries absolute-form requests (``GET http://host:port/path``, for
``http://`` targets) and ``CONNECT host:port`` tunnels (for ``https://`` ones), may demand
Basic credentials (407 otherwise), and records what it carried.

One request per connection: an absolute-form request goes on with ``Connection: close``, so
the client opens a new connection for the next one and each is seen here."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field


@dataclass
class Carried:
    method: str
    target: str  # the absolute URL, or host:port for CONNECT
    proxy_authorization: str | None


@dataclass
class ForwardProxy:
    credentials: tuple[str, str] | None = None
    #: answer every request it carries with this status, quoting the request (headers and
    #: all) in the body, as some proxies' error pages do, instead of passing it on
    echo_status: int | None = None
    carried: list[Carried] = field(default_factory=list)
    refused: list[Carried] = field(default_factory=list)  # answered 407
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, target, version = request_line.split(" ")
        headers = [h for h in header_lines if h]
        auth = next(
            (h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("proxy-auth")),
            None,
        )
        seen = Carried(method, target, auth)
        if self.credentials is not None:
            # (the user and password in UTF-8, as curl sends what a URL's escapes stand for)
            wanted = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if auth != wanted:
                self.refused.append(seen)
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="test"\r\n'
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                return
        self.carried.append(seen)
        if self.echo_status is not None:
            body = f"cannot reach the server; your request was:\n{head}".encode("latin-1")
            writer.write(
                f"HTTP/1.1 {self.echo_status} Bad Gateway\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        else:
            rest = target.split("://", 1)[1]
            authority, _, path = rest.partition("/")
            host, _, port = authority.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            kept = [
                h
                for h in headers
                if not h.lower().startswith(("proxy-", "connection:", "keep-alive:"))
            ]
            forwarded = [f"{method} /{path} {version}", *kept, "Connection: close", "", ""]
            up_writer.write("\r\n".join(forwarded).encode("latin-1"))
            await up_writer.drain()
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(65536):
            dst.write(chunk)
            await dst.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            if dst.can_write_eof():
                dst.write_eof()
