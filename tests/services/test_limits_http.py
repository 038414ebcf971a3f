"""Connection, body and cost limits against the live service: local Ray, Serve's HTTP proxy, 127.0.0.1.

Two applications share one Serve instance whose proxy runs ``services.limits.BodyLimits``:
- ``main`` at / : one generator replica taking 1 request and queueing 1, so the ingress holds
  ``1 + 1 + INGRESS_HEADROOM`` requests (its capacity); headers must be complete within 2 s, bodies
  must arrive within 4 s;
- ``quick`` at /quick : a 2 s request timeout (a render that outlives it must stop).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from fastapi import FastAPI, Request     # module level: this module's annotations are strings

from service_helpers import bearer, make_token, roomy_auth
from services.limits import ENV_SETTINGS, LimitSettings, proxy_environment, with_header_timeout

pytestmark = [pytest.mark.ray, pytest.mark.service]

AUTH: dict[str, str] = {}     # the bearer header of the fixture's token, once it has one
LIMITS = LimitSettings(body_timeout_s=4.0, header_timeout_s=2.0)
SMALL = {"prompt": "a red square", "seed": 1, "steps": 2, "guidance": 2.0, "width": 64, "height": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    from cluster.local_ray import start_local_ray
    from services.config import ServiceConfig

    work = tmp_path_factory.mktemp("limits")
    (work / "registry").mkdir()
    temp_dir = Path(f"/tmp/pclim-{os.getpid()}")
    env = proxy_environment(LIMITS)
    saved = {k: os.environ.get(k) for k in env}
    ray = start_local_ray(2, temp_dir=temp_dir, env=env)
    from ray import serve     # ray and services.app only now: Ray reads its node-IP settings at import

    from services.app import INGRESS_HEADROOM, build_app

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tokens = work / "tokens.json"          # auth on, as served: the limits act before it
    AUTH.update(bearer(make_token(tokens, "limits", "generate", "submit")))
    common = dict(model=str(tiny_model_dir), registry=str(work / "registry"), cpus_per_replica=0.5, warmup=False,
                  batch_wait_s=0.0, limits=LIMITS, auth=roomy_auth(tokens))
    main = ServiceConfig(**common, max_ongoing_requests=1, max_queued_requests=1, request_timeout_s=60)
    quick = ServiceConfig(**common, request_timeout_s=2.0)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(quick), name="quick", route_prefix="/quick")
        serve.run(build_app(main), name="main", route_prefix="/")
        for base in (url, url + "/quick"):      # the ingress caches the model's description
            assert requests.post(base + "/v1/generate", json=SMALL, timeout=120, headers=AUTH).status_code == 200
        capacity = main.replicas * main.max_ongoing_requests + main.max_queued_requests + INGRESS_HEADROOM
        yield url, capacity
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


def stalled_request(port: int, path: str, chunked: bool) -> socket.socket:
    """A connection that sends a request's headers (and for chunked, one chunk), then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: 1000"
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
            + ("5\r\n{\"pro\r\n" if chunked else '{"pro'))
    sock.sendall(head.encode())
    sock.setblocking(False)
    return sock


def outcomes(socks: list[socket.socket], within_s: float) -> dict[socket.socket, str]:
    """Each connection's fate within ``within_s``: its status line, 'closed', or 'open' (still held)."""
    return {s: "open" if at is None else (sent.split(b"\r\n", 1)[0].decode(errors="replace") or "closed")
            for s, (at, sent) in close_times(socks, within_s).items()}


def test_stalled_bodies_leave_the_service_answering(service):
    url, capacity = service
    port = int(url.rsplit(":", 1)[1])
    n = 4 * capacity
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            path = "/v1/generate" if i % 2 == 0 else "/v1/batches"
            socks.append(stalled_request(port, path, chunked=i % 4 >= 2))
        opened = time.monotonic()
        time.sleep(0.5)            # every request's headers are in; none has a body
        for _ in range(3):
            t = time.perf_counter()
            resp = requests.get(url + "/healthz", timeout=5)
            took = time.perf_counter() - t
            assert resp.status_code == 200 and took < 1.0, (resp.status_code, took)
        t = time.perf_counter()
        assert requests.post(url + "/v1/generate", json=SMALL, timeout=30, headers=AUTH).status_code == 200
        print(f"{n} stalled connections (4 x capacity {capacity}); a generate answered in "
              f"{time.perf_counter() - t:.2f}s")
        fate = outcomes(socks, within_s=LIMITS.body_timeout_s + 20)
        held = time.monotonic() - opened
        lines = {f for f in fate.values()}
        print(f"after {held:.1f}s: {sorted(lines)}")
        assert lines <= {"HTTP/1.1 408 Request Timeout", "closed"}, lines
        assert "HTTP/1.1 408 Request Timeout" in lines
    finally:
        for s in socks:
            s.close()


def close_times(socks: list[socket.socket], within_s: float) -> dict[socket.socket, tuple[float | None, bytes]]:
    """When (monotonic) the server closed each connection within ``within_s`` (None: still open), and
    what it sent before."""
    closed: dict[socket.socket, float | None] = {s: None for s in socks}
    got = {s: b"" for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + within_s
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            got[s] += data
            if not data:
                closed[s] = time.monotonic()
                sel.unregister(s)
    sel.close()
    return {s: (closed[s], got[s]) for s in socks}


def read_response(sock: socket.socket) -> bytes:
    """One whole response (Content-Length or chunked) from a blocking socket: its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096) or pytest.fail(f"closed before a response: {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    length = [int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    while (len(body) < length[0]) if length else not body.endswith(b"0\r\n\r\n"):
        body += sock.recv(4096) or pytest.fail(f"closed within a response: {data!r}")
    return head


def send_slowly(sock: socket.socket, request: bytes, pieces: int, over_s: float) -> None:
    step = -(-len(request) // pieces)
    for i in range(0, len(request), step):
        sock.sendall(request[i:i + step])
        time.sleep(over_s / pieces)


def test_stalled_headers_are_closed_and_the_service_answers(service):
    """4 x capacity connections that never finish their headers (a request-line fragment, unfinished
    headers, unfinished headers dripping a byte every 0.25 s): /healthz answers meanwhile, and the
    server closes every one of them header_timeout_s after it opened, not before."""
    url, capacity = service
    port = int(url.rsplit(":", 1)[1])
    heads = [b"POST /v1/gen", b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"]
    n, timeout, margin = 4 * capacity, LIMITS.header_timeout_s, 1.5
    socks: list[socket.socket] = []
    opened: dict[socket.socket, float] = {}
    stop = threading.Event()

    def drip(targets: list[socket.socket]) -> None:
        while not stop.wait(0.25):
            for s in targets:
                try:
                    s.send(b"a")
                except OSError:       # closed by the server, or the send buffer is full
                    pass
    try:
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            opened[sock] = time.monotonic()
            sock.sendall(heads[min(i % 3, 1)])
            sock.setblocking(False)
            socks.append(sock)
        dripper = threading.Thread(target=drip, args=(socks[2::3],), daemon=True)
        dripper.start()
        time.sleep(0.3)
        for _ in range(3):
            t = time.perf_counter()
            resp = requests.get(url + "/healthz", timeout=5)
            took = time.perf_counter() - t
            assert resp.status_code == 200 and took < 1.0, (resp.status_code, took)
        fate = close_times(socks, within_s=timeout + margin + 1.0)
        stop.set()
        held = {s: None if at is None else at - opened[s] for s, (at, _) in fate.items()}
        closed = [h for h in held.values() if h is not None]
        print(f"{n} connections with unfinished headers (4 x capacity {capacity}), header timeout {timeout}s: "
              f"{len(closed)} closed" + (f", after {min(closed):.2f}..{max(closed):.2f}s" if closed else ""))
        assert len(closed) == n, f"{n - len(closed)} of {n} connections were not closed"
        for i, s in enumerate(socks):
            assert timeout - 0.2 <= held[s] <= timeout + margin, (i, held[s])
            assert fate[s][1] == b"", (i, fate[s][1])
    finally:
        stop.set()
        for s in socks:
            s.close()


def test_a_slow_client_within_the_header_timeout_is_served(service):
    """Headers sent in pieces within header_timeout_s are answered, also on a keep-alive connection
    idle longer than that timeout (the idle wait is uvicorn's keep-alive); the timeout counts again
    from the next request's first byte."""
    url, _ = service
    timeout = LIMITS.header_timeout_s
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n\r\n"
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as sock:
        send_slowly(sock, request, pieces=5, over_s=0.6 * timeout)
        assert read_response(sock).startswith(b"HTTP/1.1 200"), "slow but complete headers"
        time.sleep(timeout + 0.5)
        send_slowly(sock, request, pieces=5, over_s=0.6 * timeout)
        assert read_response(sock).startswith(b"HTTP/1.1 200"), "after a keep-alive idle > header timeout"
        sock.sendall(request[:20])
        t = time.monotonic()
        sock.settimeout(timeout + 5)
        assert sock.recv(4096) == b""
        assert timeout - 0.2 <= time.monotonic() - t <= timeout + 1.5, time.monotonic() - t


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_plain_uvicorn_gets_the_header_timeout(http):
    """``with_header_timeout`` on both of uvicorn's HTTP/1.1 protocols, without Serve: unfinished headers
    are closed at the timeout; a request whose app (or body) takes longer is not."""
    import asyncio

    import uvicorn

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(1.5 if scope["path"] == "/slow" else 0.0)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           http=with_header_timeout(http, 1.0, max_bytes=8192),
                                           timeout_keep_alive=10))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        opened = time.monotonic()
        for sock, head in zip(stalled, (b"", b"GET /x HT", b"GET /x HTTP/1.1\r\nHost: a\r\n")):
            sock.sendall(head)
            sock.setblocking(False)
        fate = close_times(stalled, within_s=5)
        for sock in stalled:
            sock.close()
        held = [None if at is None else at - opened for at, _ in fate.values()]
        assert all(h is not None and 0.8 <= h <= 2.5 for h in held), held
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")            # the app outlives the timeout
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
            time.sleep(1.2)                                                    # so does the body
            sock.sendall(b"cd")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 6000 + b"\r\n\r\n")   # under the cap
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        # headers past the byte cap: closed at once, long before the timeout (h11's own 16 KiB limit may
        # answer 400 first; httptools has none, so there it is the cap)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            t = time.monotonic()
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"a" * 20_000)
            try:
                got = sock.recv(4096)
            except ConnectionResetError:          # closed with unread bytes in its buffer: a reset
                got = b""
            assert (got == b"" or (http == "h11" and got.startswith(b"HTTP/1.1 400"))), got[:80]
            assert time.monotonic() - t < 0.8, time.monotonic() - t
    finally:
        server.should_exit = True
        thread.join(10)


def test_408_is_an_error_body(service):
    url, _ = service
    sock = stalled_request(int(url.rsplit(":", 1)[1]), "/v1/generate", chunked=False)
    try:
        sock.setblocking(True)
        sock.settimeout(LIMITS.body_timeout_s + 20)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {
        "detail": "the request body did not arrive within the limit (5 bytes received); send it at once",
        "concept": None}


def test_bodies_are_limited_on_every_route(service):
    url, _ = service
    big = b"x" * (LIMITS.max_body_bytes + 1)
    for method, path in (("POST", "/v1/generate"), ("GET", "/v1/concepts"), ("GET", "/healthz")):
        resp = requests.request(method, url + path, data=big, timeout=30)
        assert resp.status_code == 413, (path, resp.text)
        assert resp.json() == {"detail": f"the body ({len(big)} bytes) exceeds {LIMITS.max_body_bytes} bytes",
                               "concept": None}


def test_chunked_bodies_are_counted_as_received(service):
    url, _ = service
    chunks = [b"x" * 8192] * (LIMITS.max_body_bytes // 8192 + 1)       # no Content-Length: chunked
    resp = requests.post(url + "/v1/generate", data=iter(chunks), timeout=30,
                         headers={"content-type": "application/json", **AUTH})
    assert resp.status_code == 413, resp.text
    assert resp.json()["detail"] == f"the body exceeds {LIMITS.max_body_bytes} bytes"
    under = requests.post(url + "/v1/generate", data=iter([b'{"prompt": 1}']), timeout=30,
                          headers={"content-type": "application/json", **AUTH})
    assert under.status_code == 422, under.text         # reached the app, which names the field


def test_the_batch_route_has_its_own_larger_limit(service):
    url, _ = service
    body = b" " * (LIMITS.max_body_bytes + 1)           # too large for generate, fine for a batch
    resp = requests.post(url + "/v1/batches", data=body, timeout=30, headers={"content-type": "application/json", **AUTH})
    assert resp.status_code == 404 and "not enabled" in resp.json()["detail"], resp.text
    too_big = b" " * (LIMITS.max_batch_body_bytes + 1)
    assert requests.post(url + "/v1/batches", data=too_big, timeout=30, headers=AUTH).status_code == 413


def test_the_ingress_enforces_its_config_without_the_proxy_hook():
    """Installed on a FastAPI app (as ``services.app`` does), settings from ``app.state.limits``,
    served by uvicorn on 127.0.0.1 without Serve."""
    import threading

    import uvicorn

    from services.limits import install

    app = FastAPI()
    install(app)
    app.state.limits = LimitSettings(max_body_bytes=2048, body_timeout_s=1.0)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/echo"
        assert requests.post(url, data=b"x" * 2048, timeout=10).json() == {"bytes": 2048}
        over = requests.post(url, data=iter([b"x" * 1024] * 3), timeout=10)          # chunked
        assert over.status_code == 413 and over.json()["detail"] == "the body exceeds 2048 bytes"
        assert over.headers["connection"] == "close"
        stalled = stalled_request(port, "/echo", chunked=False)
        try:
            fate = outcomes([stalled], within_s=10)
        finally:
            stalled.close()
        assert list(fate.values()) == ["HTTP/1.1 408 Request Timeout"]
    finally:
        server.should_exit = True
        thread.join(10)


def test_render_cost_is_bounded(service):
    url, _ = service
    side, images = 512, 4
    steps = LIMITS.max_render_cost // (side * side * images) + 1
    resp = requests.post(url + "/v1/generate", timeout=30, json={**SMALL, "width": side, "height": side,
                                                                 "steps": steps, "num_images": images}, headers=AUTH)
    assert resp.status_code == 422, resp.text
    (problem,) = resp.json()["detail"]
    assert problem["loc"] == ["body", "steps"]
    for name in ("width", "height", "steps", "num_images"):
        assert name in problem["msg"]
    assert str(LIMITS.max_render_cost) in problem["msg"]


def test_a_timed_out_render_frees_the_replica(service):
    url, _ = service
    quick = url + "/quick/v1/generate"
    side, images = 512, 4
    steps = LIMITS.max_render_cost // (side * side * images)     # the largest admitted: ~30 s on a CPU
    t = time.perf_counter()
    long = requests.post(quick, timeout=60, json={**SMALL, "width": side, "height": side, "steps": steps,
                                                  "num_images": images}, headers=AUTH)
    assert long.status_code == 503 and "no answer within 2s" in long.json()["detail"], long.text
    t = time.perf_counter()
    resp = requests.post(quick, json=SMALL, timeout=60, headers=AUTH)
    took = time.perf_counter() - t
    print(f"the next request after a timed-out {side}x{side}x{steps}x{images} render: {took:.2f}s")
    assert resp.status_code == 200, resp.text
    assert took < 8.0, f"the replica was still rendering the abandoned request ({took:.1f}s)"
