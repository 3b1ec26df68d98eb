"""The HTTP edge: uvicorn's configuration and the limits that act before any handler runs.

Everything here happens while uvicorn parses a request, so a hostile client is refused for the
cost of parsing its request line and headers:

- header count, header bytes and URL length are capped (httptools itself has no limit, and a
  16 MiB header or 20,000 headers would otherwise be accepted and copied into the ASGI scope);
- malformed requests and exceeded limits are answered with the service's JSON error shape,
  not uvicorn's plain text, so clients parse one error format everywhere;
- ``limit_concurrency`` is a last-resort backstop on connections; the in-flight request limit
  of ``service.edge.app.ObserveRequests`` is what answers overload first (with JSON and Retry-After).

A response's head and body leave in one ``send()``: uvicorn writes them separately, and each
write to a loopback socket wakes the client and costs ~0.1-0.2 ms of the server's event loop.

Both ``dyce-serve`` and the end-to-end tests build their server from ``uvicorn_config`` so the
tests exercise the same edge that production runs.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..settings import Settings

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # what uvicorn writes before reading an expecting body


class _Refused(httptools.HttpParserError):
    """Raised from a parser callback; uvicorn's ``data_received`` answers it with our response."""


class _HeadWithBody:
    """The transport as one request's ``RequestResponseCycle`` sees it: the response head (its
    first write, but for an interim ``100 Continue``) waits for the body's first write and leaves
    with it.

    uvicorn writes the head and the body in the same step of the handler's task, so the head
    never waits long; a response with no body write (HEAD) still gets its head written by the
    callback scheduled when it was held, and ``close`` writes a held head first. Were anything
    else ever held by mistake, that callback writes it within the same turn of the loop.
    """

    __slots__ = ("_transport", "_head", "_head_seen")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._head_seen = False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif not self._head_seen and data != CONTINUE:
            self._head, self._head_seen = data, True
            asyncio.get_running_loop().call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_headers = 100
    max_header_bytes = 64 * 1024
    max_url_bytes = 8 * 1024

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._refusal: tuple[int, str, str] | None = None

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._refusal = (status, code, message)
        raise _Refused(message)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:  # an HTTP request, not an upgrade
            self.cycle.transport = _HeadWithBody(self.transport)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.max_url_bytes:
            self._refuse(414, "uri_too_long", f"request URL longer than {self.max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if len(self.headers) >= self.max_headers:
            self._refuse(431, "headers_too_large", f"more than {self.max_headers} request headers")
        if self._header_bytes > self.max_header_bytes:
            self._refuse(431, "headers_too_large", f"request headers exceed {self.max_header_bytes} bytes")
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        status, code, message = getattr(self, "_refusal", None) or (400, "bad_request", "malformed HTTP request")
        body = json.dumps({"error": message, "code": code}).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nx-error-code: %s\r\nconnection: close\r\n\r\n"
            % (len(body), code.encode())
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with this server's limits (uvicorn instantiates it per connection)."""
    return type(
        "DyceHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_headers": settings.max_header_count,
            "max_header_bytes": settings.max_header_bytes,
            "max_url_bytes": settings.max_url_bytes,
        },
    )


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_protocol(settings),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "log_level": "info",
        "access_log": False,
    }
    return uvicorn.Config(app, **(options | overrides))
