"""Serving on a real 2-node Ray cluster: two generator replicas, one per node (``max_replicas_per_node``),
the ingress on the head. Requests for a concept set go to the replica that already holds it (hits counted
from each answer's ``hot_loaded``), and when a replica's node is removed (its raylet and workers killed at
once) requests go on on the other replica: no 500, no answer other than 200, the same images.

Which node a replica runs on comes from Ray itself: each replica reports its node id in ``stats``."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from purecc.registry import AdapterRegistry
from service_helpers import bearer, free_port, make_token, roomy_auth

pytestmark = pytest.mark.multinode
APP = "mn"
SETS = {"A": ("c0",), "B": ("c1", "c2")}


def _body(which: str, seed: int) -> dict:
    ids = SETS[which]
    return {"prompt": " and ".join(f"a <{c}> thing" for c in ids), "concepts": [{"id": c} for c in ids],
            "seed": seed, "steps": 2, "width": 32, "height": 32}


def _pixels(answer: dict) -> np.ndarray:
    png = base64.b64decode(answer["images"][0]["png_base64"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_replicas_on_two_nodes_keep_their_concepts_and_survive_a_lost_node(nodes, tiny_model_dir, adapter_factory,
                                                                            tmp_path):
    from ray import serve

    from services.app import build_app
    from services.config import ServiceConfig

    registry = AdapterRegistry(tmp_path / "registry")
    for i in range(3):
        adapter_factory.publish(registry, f"c{i}", seed=60 + i, trigger=f"t{i}x")
    tokens = tmp_path / "tokens.json"
    headers = bearer(make_token(tokens, "tester", "generate"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    cfg = ServiceConfig(model=str(tiny_model_dir), registry=str(tmp_path / "registry"), replicas=2,
                        cpus_per_replica=0.5, max_replicas_per_node=1, ingress_on_head=True, slots=3,
                        warmup=False, routing_stats_period_s=0.5, batch_wait_s=0.0, auth=roomy_auth(tokens))
    serve.run(build_app(cfg), name=APP, route_prefix="/")

    # the two replicas, from their own reports (a stats call goes to either replica: 24 calls reach both)
    handle = serve.get_deployment_handle("ConceptGenerator", APP)
    node_of: dict[str, str] = {}
    for _ in range(24):
        s = handle.stats.remote().result(timeout_s=60)
        node_of[s["replica"]] = s["node_id"]
    names = {r: nodes.name_of(n) for r, n in node_of.items()}
    assert sorted(names.values()) == ["node_a", "node_b"], names

    def post(which: str, seed: int) -> requests.Response:
        return requests.post(url + "/v1/generate", json=_body(which, seed), headers=headers, timeout=120)

    # each set's first request loads it somewhere; after the routers learn the residency, every
    # request for a set goes to its holder and loads nothing (a hit)
    first = {w: post(w, seed=0).json() for w in SETS}
    holder = {w: a["replica"] for w, a in first.items()}
    assert all(c["hot_loaded"] for a in first.values() for c in a["concepts"]), first
    time.sleep(3.0)
    hits, served = 0, []
    for i in range(12):
        which = "AB"[i % 2]
        answer = post(which, seed=i + 1).json()
        served.append((which, answer["replica"]))
        hits += not any(c["hot_loaded"] for c in answer["concepts"])
    print("holders:", {w: names[r] for w, r in holder.items()}, "hits:", hits, "of", len(served))
    assert served == [(w, holder[w]) for w, _ in served] and hits == len(served), (holder, served)

    # lose the node of set A's holder while requests keep coming
    lost = names[holder["A"]]
    survivor = next(r for r, n in names.items() if n != lost)
    reference = {w: _pixels(post(w, seed=99).json()) for w in SETS}
    statuses: list[tuple[float, str, int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            which = "AB"[i % 2]
            try:
                resp = post(which, seed=99)
                statuses.append((time.time(), which, resp.status_code,
                                 resp.json().get("replica") if resp.ok else resp.text[:300]))
                if resp.ok:
                    diff = int(np.abs(_pixels(resp.json()) - reference[which]).max())
                    assert diff <= 2, (which, diff)       # the same image, whichever replica drew it
            except requests.RequestException as exc:   # a refused or dropped connection counts as a failure
                statuses.append((time.time(), which, -1, repr(exc)[:300]))
            i += 1

    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    time.sleep(2.0)
    killed_at = time.time()
    nodes.remove(lost)
    time.sleep(20.0)
    stop.set()
    sender.join(150)
    assert not sender.is_alive()
    before = [s for s in statuses if s[0] < killed_at]
    after = [s for s in statuses if s[0] >= killed_at]
    print("requests before the loss:", len(before), "after:", len(after),
          "answers after:", sorted({(s[1], s[2], s[3] if s[2] != 200 else names.get(s[3])) for s in after}))
    assert before and len(after) >= 4, statuses
    assert all(code == 200 for _, _, code, _ in statuses), [s for s in statuses if s[2] != 200]
    # the later ones all on the surviving replica, set A loaded there
    assert {rep for t, _, _, rep in after if t > killed_at + 10} == {survivor}, after
    moved = post("A", seed=5).json()
    assert moved["replica"] == survivor and not any(c["hot_loaded"] for c in moved["concepts"]), moved
