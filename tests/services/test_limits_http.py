"""Connection, body and cost limits against the live service: local Ray, Serve's HTTP proxy, 127.0.0.1.

Two applications share one Serve instance whose proxy runs ``services.limits.BodyLimits``:
- ``main`` at / : one generator replica taking 1 request and queueing 1, so the ingress holds
  ``1 + 1 + INGRESS_HEADROOM`` requests (its capacity); bodies must arrive within 4 s;
- ``quick`` at /quick : a 2 s request timeout (a render that outlives it must stop).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import time
from pathlib import Path

import pytest
import requests
from fastapi import FastAPI, Request     # module level: this module's annotations are strings

from service_helpers import bearer, make_token, roomy_auth
from services.limits import ENV_SETTINGS, LimitSettings, proxy_environment

pytestmark = [pytest.mark.ray, pytest.mark.service]

AUTH: dict[str, str] = {}     # the bearer header of the fixture's token, once it has one
LIMITS = LimitSettings(body_timeout_s=4.0)
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
    fate = {s: "open" for s in socks}
    got = {s: b"" for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + within_s
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            got[s] += data
            if not data:      # closed by the server
                fate[s] = got[s].split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
                sel.unregister(s)
    sel.close()
    return fate


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
