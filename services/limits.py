"""Connection, body and cost limits: no client can hold the service with bytes it never sends.

Where a stalled body holds resources (Ray Serve 2.60, ``ray/serve/_private/proxy.py``,
``HTTPProxy.send_request_to_replica``): the HTTP proxy hands a request to the ingress replica as soon
as its headers arrive, and the replica then pulls the body from the proxy
(``receive_asgi_messages``). A request whose body never comes therefore holds one of the ingress
replica's ``max_ongoing_requests`` until the client goes away; about that many stalled connections
leave nothing for ``/healthz`` or anyone else.

So the body is read where it costs nothing: ``BodyLimits``, an ASGI middleware installed in Serve's
HTTP proxy through Serve's own hook (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, which names a
function returning Starlette middlewares; ``proxy_environment`` gives the variables), reads the whole
body before the proxy routes the request, counting the bytes received (a ``Content-Length`` is
believed only when it is too large; chunked bodies are counted the same way), under a deadline.
Too slow: 408; too large: 413; both in the service's ``ErrorBody`` shape and with
``Connection: close``, so the connection goes too. The same middleware is installed on the FastAPI
app as well (``install``), so the limits hold on every route even where the proxy has no hook set
(a ``serve deploy`` onto a cluster whose proxies were started without it).

Headers: a connection still sending its headers never reaches the proxy's routing, so it holds no
replica, but uvicorn 0.54 has no header-read timeout (its only timer is keep-alive, armed after a
response and cancelled by the next byte): such a connection held a socket forever. ``HeaderTimeout``
closes it ``header_timeout_s`` after it opened, or, on a keep-alive connection, after the first byte
of its next request (the idle wait before that byte stays uvicorn's keep-alive timer, Serve's 90 s,
longer than a load balancer's idle timeout). The body deadline starts when the headers are complete.
It is a mixin on uvicorn's HTTP protocol class (``with_header_timeout``); in the proxy,
``proxy_middlewares`` wraps ``uvicorn.Config.load`` so the protocol class Serve's ``uvicorn.Config``
selects (``http="auto"``: httptools, which ``ray[serve]`` installs, else h11) comes back wrapped. It
relies on uvicorn internals, shared by its ``H11Protocol`` and ``HttpToolsProtocol``: both create a
new ``self.cycle`` (a ``RequestResponseCycle`` with ``response_complete``) inside ``data_received``
once a request's headers are complete, and hand a WebSocket upgrade to another protocol with
``transport.set_protocol``; and on Serve 2.60 building its server with ``uvicorn.Config(...)`` and
``Server.serve`` in the process (the proxy, or a replica's direct ingress) that ran the hook. Plain
uvicorn: pass ``http=with_header_timeout("auto", seconds)`` to ``uvicorn.Config``; ``install`` can't,
the app never sees a connection before its headers.

Hand-written because neither Starlette nor uvicorn offers a body deadline, a received-bytes limit or
a header-read timeout (uvicorn's ``limit_concurrency`` counts connections, which would turn the
stalled clients into 503s for everyone; ``timeout_keep_alive`` stops counting at the first byte).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[dict, Receive, Send], Awaitable[None]]

ENV_SETTINGS = "PURECC_LIMITS"              # the proxy's LimitSettings, as JSON
PROXY_CALLBACK = "services.limits:proxy_middlewares"
BATCH_PATH = "/v1/batches"
UPLOAD_PATH = "/v1/datasets"


class LimitSettings(BaseModel):
    """How long and how much a request may send, and how much rendering it may ask for.

    The cost bound, measured on the embedded tiny model on one CPU thread: ~1.1 us per pixel-step at
    512 x 512 (its largest side), so the largest request the schema admits (512^2 x 100 steps x 4
    images = 105 M) held a replica for ~113 s. The default, 32 Mi pixel-steps (one 1024^2 image at 32
    steps), holds it for at most ~36 s there, below the default request timeout; on a GPU with
    SD3.5-M it admits the usual single 1024^2 image at 28 steps.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    header_timeout_s: float = Field(10.0, gt=0, le=300, description="A connection's request headers must be "
                                                                    "complete within this many seconds after it "
                                                                    "opened (or after the first byte of its next "
                                                                    "request), else it is closed.")
    header_max_bytes: int = Field(65_536, ge=1024, le=1 << 20, description="Bytes a connection may send before "
                                  "its request headers are complete, else it is closed (httptools, Serve's "
                                  "parser, has no cap of its own).")
    body_timeout_s: float = Field(10.0, gt=0, le=300, description="A request's whole body must arrive within "
                                                                  "this many seconds after its headers, else "
                                                                  "408 and the connection is closed.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest body of any route but POST "
                                                                "/v1/batches and /v1/datasets (a generate "
                                                                "request is < 20 KiB); "
                                                                "counted on received bytes, 413 past it.")
    max_batch_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest body of POST /v1/batches.")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest body of POST /v1/datasets "
                                                                         "(a multipart upload of images or "
                                                                         "one zip); buffered in memory by the "
                                                                         "proxy before the app runs.")
    max_render_cost: int = Field(32 * 1024 * 1024, ge=1, description="Most width x height x steps x "
                                                                      "num_images one generate request may ask "
                                                                      "for (422 past it): bounds how long one "
                                                                      "request holds a replica.")

    def body_limit(self, path: str) -> int:
        """The body limit of a request path (route prefixes allowed)."""
        path = path.rstrip("/")
        if path.endswith(BATCH_PATH):
            return self.max_batch_body_bytes
        return self.max_upload_bytes if path.endswith(UPLOAD_PATH) else self.max_body_bytes


class BodyRefused(Exception):
    """The body came too slowly or was too large: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, detail: str):
        super().__init__(status, detail)
        self.status, self.detail = status, detail


async def read_body(receive: Receive, limit: int, deadline: float) -> tuple[list[Message], bool]:
    """The request's ``http.request`` messages, counted and timed; (messages, client disconnected)."""
    messages, size = [], 0
    while True:
        left = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), max(left, 0.0))
        except asyncio.TimeoutError:
            raise BodyRefused(408, f"the request body did not arrive within the limit ({size} bytes "
                                   "received); send it at once") from None
        if message["type"] == "http.disconnect":
            return messages, True
        size += len(message.get("body", b""))
        if size > limit:
            raise BodyRefused(413, f"the body exceeds {limit} bytes")
        messages.append(message)
        if not message.get("more_body", False):
            return messages, False


def _declared_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


async def _refuse(send: Send, exc: BodyRefused) -> None:
    from .schemas import ErrorBody    # here: the proxy imports this module, it needs the schemas only now

    body = json.dumps(ErrorBody(detail=exc.detail).model_dump()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    """ASGI middleware: the whole body, within the deadline and the size limit, before the app runs.

    The app then gets the buffered body and afterwards the client's own ``receive`` (so disconnects
    are still seen). ``settings``: fixed, or None to read ``scope["app"].state.limits`` per request
    (the ingress sets it from its service config), falling back to the defaults.
    """

    def __init__(self, app: ASGIApp, settings: LimitSettings | None = None):
        self.app, self.settings = app, settings

    def _settings(self, scope: dict) -> LimitSettings:
        if self.settings is not None:
            return self.settings
        state = getattr(scope.get("app"), "state", None)
        return getattr(state, "limits", None) or LimitSettings()

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self._settings(scope)
        limit = settings.body_limit(scope.get("path", ""))
        declared = _declared_length(scope)
        try:
            if declared is not None and declared > limit:
                raise BodyRefused(413, f"the body ({declared} bytes) exceeds {limit} bytes")
            messages, gone = await read_body(receive, limit, time.monotonic() + settings.body_timeout_s)
        except BodyRefused as exc:
            return await _refuse(send, exc)
        if gone:
            return None

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)


class HeaderTimeout:
    """Mixin for uvicorn's ``H11Protocol`` / ``HttpToolsProtocol``: closes a connection whose request
    headers are not complete ``header_timeout_s`` after it opened or, once a response was sent, after
    the first byte of its next request (see the module docstring for the internals it uses)."""

    header_timeout_s: float = LimitSettings.model_fields["header_timeout_s"].default
    header_max_bytes: int = LimitSettings.model_fields["header_max_bytes"].default
    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0              # received while this request's headers are incomplete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._header_timer is None and (cycle is None or cycle.response_complete):
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)
        waiting = self._header_timer is not None
        super().data_received(data)
        if self.cycle is not cycle or self.transport.get_protocol() is not self:    # headers in, or upgraded
            self._stop_header_timer()
        elif waiting:              # still in the headers: counted, and cut past the cap
            self._header_bytes += len(data)
            if self._header_bytes > self.header_max_bytes:
                self._headers_late()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _stop_header_timer(self) -> None:
        self._header_bytes = 0
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._stop_header_timer()
        if not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(protocol: type | str, timeout_s: float, max_bytes: int | None = None) -> type:
    """uvicorn's HTTP protocol ``protocol`` (a class, or a name for ``uvicorn.Config(http=...)``:
    "auto", "h11", "httptools") with ``HeaderTimeout`` of ``timeout_s`` seconds and ``max_bytes`` (default
    ``LimitSettings``'s) before the headers are complete."""
    limits = {"header_timeout_s": timeout_s,
              "header_max_bytes": max_bytes or LimitSettings.model_fields["header_max_bytes"].default}
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if isinstance(protocol, str):
        protocol = import_from_string(HTTP_PROTOCOLS.get(protocol, protocol))
    known: tuple[type, ...] = (H11Protocol,)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        known += (HttpToolsProtocol,)
    except ImportError:
        pass
    if not issubclass(protocol, known):
        raise TypeError(f"no header timeout for uvicorn protocol {protocol.__qualname__}: only h11 and httptools")
    if issubclass(protocol, HeaderTimeout):        # wrapped already (given explicitly): only the limits change
        return type(protocol.__name__, (protocol,), limits)
    return type(f"{protocol.__name__}HeaderTimeout", (HeaderTimeout, protocol), limits)


def install_header_timeout(timeout_s: float, max_bytes: int | None = None) -> None:
    """From now on every ``uvicorn.Config`` this process loads serves with ``HeaderTimeout``: wraps
    ``Config.load`` (which resolves ``http=`` into ``http_protocol_class``, read by ``Server.startup``),
    for servers built by others (Serve's proxy). Calling it again only changes the timeout."""
    from uvicorn.config import Config

    load = getattr(Config.load, "__wrapped__", Config.load)

    @functools.wraps(load)
    def load_with_header_timeout(self) -> None:
        load(self)
        self.http_protocol_class = with_header_timeout(self.http_protocol_class, timeout_s, max_bytes)
    Config.load = load_with_header_timeout


def install(app) -> None:
    """Install ``BodyLimits`` on a FastAPI/Starlette app (settings from ``app.state.limits``). The
    header timeout is the server's: under plain uvicorn pass ``http=with_header_timeout(...)``."""
    app.add_middleware(BodyLimits)


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback, with the settings in ``$PURECC_LIMITS``: ``BodyLimits``, and the
    header timeout installed on the uvicorn server the proxy is about to start."""
    from starlette.middleware import Middleware

    raw = os.environ.get(ENV_SETTINGS)
    settings = LimitSettings.model_validate_json(raw) if raw else LimitSettings()
    install_header_timeout(settings.header_timeout_s, settings.header_max_bytes)
    return [Middleware(BodyLimits, settings=settings)]


def proxy_environment(settings: LimitSettings) -> dict[str, str]:
    """The variables that make Serve's HTTP proxies enforce ``settings``; they must be in the
    proxy processes' environment (set them before the local Ray starts, or on every node)."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK, ENV_SETTINGS: settings.model_dump_json()}


def check_render_cost(settings: LimitSettings, width: int, height: int, steps: int, num_images: int) -> str | None:
    """None if the request is within the cost bound, else the message naming the fields."""
    cost = width * height * steps * num_images
    if cost <= settings.max_render_cost:
        return None
    return (f"width x height x steps x num_images = {width} x {height} x {steps} x {num_images} = {cost} "
            f"exceeds this service's render cost bound {settings.max_render_cost}; lower steps, num_images "
            "or the image size")
