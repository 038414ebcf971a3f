"""The service end to end: local Ray, HTTP on 127.0.0.1, the tiny model.

Three applications share one Serve instance:
- ``main`` at / : 3 slots, batches of up to 8 images waiting up to 0.25 s for company;
- ``tight`` at /tight : 1 slot, 1 request in a replica and 1 queued, 1 s timeout (the 503 cases);
- ``pair`` at /pair : 2 generator replicas (concept-affinity routing).

The two trained concepts and ``r0`` carry layer-wise concept embeddings and ``r1`` CLIP tokens (the
other random ones have none), so every comparison also checks that embeddings of both forms are
hot-loaded with their slot and placed per sample at each concept's own trigger (``r1`` in the
composition over HTTP).

Image comparisons decode the PNGs and allow a difference of at most ``TOLERANCE`` (1) level out
of 255, not byte equality: the replica runs torch with one thread and this process with two, a
batch of 8 runs other matmul shapes than a batch of 1, and the service's bank has more slots than
the local one (a longer inner dimension in the adapter matmuls), so float sums round differently
in the last bits and a pixel near a rounding boundary can flip by one level. Identical pixels
must come with identical PNG bytes, and the tests print the largest difference per image
(observed: 0 or 1).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from purecc.adapter_files import DIFFUSERS_WEIGHTS
from purecc.cli import main as purecc_main
from purecc.model import load_pipeline
from purecc.recipe import stage_recipe
from purecc.registry import AdapterRegistry
from purecc.trainer import ConceptJob, PackTrainer
from service_helpers import bearer, free_port, make_token, roomy_auth


pytestmark = pytest.mark.ray

TOLERANCE = 1
TRAINED = {"checkered-star": "zqx", "striped-circle": "vlk"}
RANDOM = [f"r{i}" for i in range(5)]
SIZE, STEPS, GUIDANCE = 64, 6, 5.0
SCHEMAS = ("GenerateRequest", "ConceptWeight", "GenerateResponse", "GeneratedImage", "ConceptUsed", "Timings",
           "ConceptList", "ConceptInfo", "Health", "ErrorBody")


@dataclass
class Service:
    url: str
    tight_url: str
    pair_url: str
    registry: AdapterRegistry
    model: Path
    health_log: list[int]
    work: Path
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)

    def folder(self, concept_id: str) -> Path:
        return Path(self.registry.path_of(concept_id))

    def post(self, body: dict, *, tight: bool = False, base: str | None = None) -> requests.Response:
        base = base or (self.tight_url if tight else self.url)
        return requests.post(base + "/v1/generate", json=body, timeout=120, headers=self.headers)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30, headers=self.headers)

    def stats(self, app: str = "main") -> dict:
        from ray import serve

        return serve.get_deployment_handle("ConceptGenerator", app).stats.remote().result()


def _train_concepts(model: Path, manifests: dict, dest: Path) -> dict[str, Path]:
    # with layer-wise embeddings: every comparison below routes them per sample too
    recipe = stage_recipe(1, steps=6, resolution=64, grad_accum=1, lr=3e-2, embeddings="layerwise", embedding_lr=0.5)
    jobs = [ConceptJob(cid, trig, manifests[cid], recipe, seed=i) for i, (cid, trig) in enumerate(TRAINED.items())]
    trainer = PackTrainer(load_pipeline(str(model)), jobs)
    trainer.setup()
    trainer.train()
    return {cid: trainer.export(cid, dest / cid) for cid in TRAINED}


def _poll_health(url: str, log: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            log.append(requests.get(url + "/healthz", timeout=5).status_code)
        except requests.RequestException:
            log.append(0)
        if log[-1] == 200 and log.count(200) >= 3:
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def service(tiny_model_dir, sample_manifests, adapter_factory, tmp_path_factory):
    from cluster.local_ray import start_local_ray
    from services.app import build_app
    from services.config import ServiceConfig

    work = tmp_path_factory.mktemp("service")
    registry = AdapterRegistry(work / "registry")
    for cid, folder in _train_concepts(tiny_model_dir, sample_manifests, work / "trained").items():
        registry.publish(cid, folder)
    for i, cid in enumerate(RANDOM):
        adapter_factory.publish(registry, cid, seed=10 + i, embeddings={0: True, 1: "clip-token"}.get(i, False))
    temp_dir = Path(f"/tmp/pcsvc-{os.getpid()}")
    ray = start_local_ray(2, temp_dir=temp_dir)
    from ray import serve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tokens = work / "tokens.json"
    token = make_token(tokens, "tester", "generate")
    common = dict(model=str(tiny_model_dir), registry=str(work / "registry"), cpus_per_replica=0.5, warmup=False,
                  auth=roomy_auth(tokens))
    health_log: list[int] = []
    stop = threading.Event()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        tight = ServiceConfig(**common, slots=1, max_ongoing_requests=1, max_queued_requests=1,
                              request_timeout_s=1.0, batch_wait_s=0.0, slot_wait_s=0.5)
        pair = ServiceConfig(**common, slots=2, replicas=2, routing_stats_period_s=0.5, batch_wait_s=0.0)
        deploy_tight = threading.Thread(target=serve.run, args=(build_app(tight),),
                                        kwargs={"name": "tight", "route_prefix": "/tight"})
        deploy_tight.start()
        deploy_pair = threading.Thread(target=serve.run, args=(build_app(pair),),
                                       kwargs={"name": "pair", "route_prefix": "/pair"})
        deploy_pair.start()
        poller = threading.Thread(target=_poll_health, args=(url + "/tight", health_log, stop))
        poller.start()
        main = ServiceConfig(**common, slots=3, max_batch_images=8, batch_wait_s=0.25, max_ongoing_requests=16,
                             max_queued_requests=16, request_timeout_s=60, slot_wait_s=30)
        serve.run(build_app(main), name="main", route_prefix="/")
        deploy_tight.join(120)
        deploy_pair.join(120)
        poller.join(60)
        yield Service(url, url + "/tight", url + "/pair", registry, Path(tiny_model_dir), health_log, work, token)
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ----- helpers -----------------------------------------------------------------------------
def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def assert_same(a: bytes, b: bytes, what: str) -> int:
    """Same image within TOLERANCE levels; returns the largest difference (0: identical PNG bytes)."""
    diff = max_diff(a, b)
    assert diff <= TOLERANCE, f"{what}: images differ by up to {diff} levels"
    assert diff or a == b
    return diff


def local_generate(svc: Service, out: Path, prompt: str, concepts: list[tuple[str, float]], seed: int,
                   num_images: int = 1, steps: int = STEPS, size: int = SIZE) -> list[bytes]:
    """``purecc generate --model`` in this process, adapters straight from the registry folders."""
    args = ["generate", "--model", str(svc.model), "--prompt", prompt, "--seed", str(seed), "--steps", str(steps),
            "--guidance", str(GUIDANCE), "--width", str(size), "--height", str(size),
            "--num-images", str(num_images), "--out", str(out)]
    for cid, w in concepts:
        args += ["--concept", f"{svc.folder(cid)}:{w}"]
    assert purecc_main(args) == 0
    return [(out / f"image_{seed + i}.png").read_bytes() for i in range(num_images)]


def body(prompt: str, concepts: list[tuple[str, float]], seed: int, **extra) -> dict:
    return {"prompt": prompt, "concepts": [{"id": c, "weight": w} for c, w in concepts], "seed": seed,
            "steps": STEPS, "guidance": GUIDANCE, "width": SIZE, "height": SIZE, **extra}


def served(resp: requests.Response) -> list[bytes]:
    import base64

    assert resp.status_code == 200, resp.text
    return [base64.b64decode(im["png_base64"]) for im in resp.json()["images"]]


# ----- tests -------------------------------------------------------------------------------
def test_health_is_503_until_the_model_is_loaded(service):
    log = [code for code in service.health_log if code != 0]   # 0: nothing listening yet
    assert 200 in log, log
    first_ok = log.index(200)
    assert set(log[:first_ok]) <= {404, 503}, log    # 404: Serve's proxy before the route exists
    assert set(log[first_ok:]) == {200}, log
    assert requests.get(service.url + "/healthz", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("case", ["single", "composition"])
def test_http_matches_local_generate(service, tmp_path, case, monkeypatch):
    monkeypatch.setenv("PURECC_TOKEN", service.token)          # what `purecc generate --url` sends
    concepts = [("checkered-star", 1.0)] if case == "single" else [("checkered-star", 1.0), ("r0", 0.7), ("r1", 0.9)]
    prompt = "a <checkered-star> star" + (" beside a <r0> thing and a <r1> one" if case == "composition" else "")
    local = local_generate(service, tmp_path / "local", prompt, concepts, seed=5, num_images=2)
    cli = ["generate", "--url", service.url, "--prompt", prompt, "--seed", "5", "--steps", str(STEPS),
           "--guidance", str(GUIDANCE), "--width", str(SIZE), "--height", str(SIZE), "--num-images", "2",
           "--out", str(tmp_path / "http")]
    for cid, w in concepts:
        cli += ["--concept", f"{cid}:{w}"]
    assert purecc_main(cli) == 0
    remote = [(tmp_path / "http" / f"image_{s}.png").read_bytes() for s in (5, 6)]
    diffs = [assert_same(a, b, f"{case} seed {5 + i}") for i, (a, b) in enumerate(zip(local, remote))]
    print(f"{case}: largest pixel difference per image {diffs}")
    bare = local_generate(service, tmp_path / "bare",
                          prompt.replace("<checkered-star>", "zqx").replace("<r0>", "t10x").replace("<r1>", "t11x"),
                          [], seed=5)
    assert max_diff(bare[0], local[0]) > 10, "the adapters should change the image"


# three concepts for three slots, so that which ones are resident afterwards is known (the LRU test below)
CONCEPT_SETS = [[], [("checkered-star", 1.0)], [("striped-circle", 1.0)], [("r0", 1.0)],
                [("checkered-star", 0.5), ("striped-circle", 1.0)], [("r0", 1.2), ("checkered-star", -0.5)],
                [("striped-circle", 0.8), ("r0", 0.4), ("checkered-star", 1.0)], [("r0", 2.0)]]


def test_concurrent_requests_are_batched_and_match_sequential(service):
    # each concept's trigger in the prompt, so the ones with embeddings place them at its tokens
    bodies = [body(" and ".join(["a shape"] + [f"a <{c}>" for c, _ in cs]) + " on a plain background", cs, seed=20 + i)
              for i, cs in enumerate(CONCEPT_SETS)]
    alone = [served(service.post(b))[0] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(service.post, bodies))
    together = [served(r)[0] for r in responses]
    batch_sizes = [r.json()["batch_images"] for r in responses]
    assert max(batch_sizes) > 1, batch_sizes
    diffs = [assert_same(a, b, f"set {i}") for i, (a, b) in enumerate(zip(alone, together))]
    print(f"batch sizes {batch_sizes}; largest pixel difference per image {diffs}")


def test_more_concepts_than_slots_evicts_lru_and_stays_correct(service, tmp_path):
    sequence = ["r1", "r2", "r3", "r1", "r4", "r2"]      # 3 slots; r1 is used again before r4 arrives
    stats = service.stats()
    before, resident = len(stats["events"]), {s["concept"] for s in stats["slots"] if s}
    assert len(resident) == 3 and not resident & set(sequence), resident
    for i, cid in enumerate(sequence):
        resp = service.post(body(f"a <{cid}> object", [(cid, 1.0)], seed=40 + i))
        local = local_generate(service, tmp_path / str(i), f"a <{cid}> object", [(cid, 1.0)], seed=40 + i)
        assert_same(local[0], served(resp)[0], f"{cid} (request {i})")
    stats = service.stats()
    events = stats["events"][before:]
    assert [c for kind, c, _ in events if kind == "load"] == ["r1", "r2", "r3", "r4", "r2"], events
    evicted = [c for kind, c, _ in events if kind == "evict"]
    # the three older concepts go first; then r2 (least recently used, since r1 was reused), then r3
    assert set(evicted[:3]) == resident and evicted[3:] == ["r2", "r3"], events
    assert {s["concept"] for s in stats["slots"]} == {"r1", "r4", "r2"}


def test_in_flight_slots_are_never_evicted(service, tmp_path):
    slow = body("a <checkered-star> star", [("checkered-star", 1.0)], seed=60, steps=60, width=128, height=128)
    quick = [body(f"a <{c}> object", [(c, 1.0)], seed=61 + i) for i, c in enumerate(["r2", "r3", "r4"])]
    with ThreadPoolExecutor(4) as pool:
        slow_future = pool.submit(service.post, slow)
        time.sleep(0.3)
        quick_responses = list(pool.map(service.post, quick))
        slow_response = slow_future.result()
    ref = local_generate(service, tmp_path / "slow", slow["prompt"], [("checkered-star", 1.0)], seed=60, steps=60,
                         size=128)
    assert_same(ref[0], served(slow_response)[0], "the long request")
    for i, (b, r) in enumerate(zip(quick, quick_responses)):
        cid = b["concepts"][0]["id"]
        assert_same(local_generate(service, tmp_path / str(i), b["prompt"], [(cid, 1.0)], seed=61 + i)[0],
                    served(r)[0], cid)
    slots = service.stats()["slots"]
    assert all(s is None or s["refs"] == 0 for s in slots), slots      # every hold was released


def test_concept_published_while_running_is_served(service, adapter_factory, tmp_path):
    assert "late" not in [c["id"] for c in service.get("/v1/concepts").json()["concepts"]]
    assert service.post(body("a <late> thing", [("late", 1.0)], seed=3)).status_code == 404
    adapter_factory.publish(service.registry, "late", seed=99, trigger="lte")
    listed = service.get("/v1/concepts").json()["concepts"]
    assert "late" in [c["id"] for c in listed]
    resp = service.post(body("a <late> thing", [("late", 1.0)], seed=3))
    assert resp.json()["prompt"] == "a lte thing" and resp.json()["concepts"][0]["hot_loaded"]
    assert_same(local_generate(service, tmp_path, "a <late> thing", [("late", 1.0)], seed=3)[0], served(resp)[0],
                "late concept")


def test_requests_prefer_the_replica_holding_their_concepts(service):
    first = service.post(body("a <r0> thing", [("r0", 1.0)], seed=0), base=service.pair_url).json()
    holder = first["replica"]
    time.sleep(3.0)        # the routers learn the replicas' resident concepts (polled every 0.5 s)
    replicas = [service.post(body("a <r0> thing", [("r0", 1.0)], seed=i), base=service.pair_url).json()["replica"]
                for i in range(10)]
    # random routing sends each request to either replica (all 10 to the holder: p = 2**-10)
    assert replicas == [holder] * 10, (holder, replicas)


BAD_FIELDS = [
    ({"prompt": ""}, "prompt"), ({"prompt": "x" * 1001}, "prompt"),
    ({"negative_prompt": "x" * 1001}, "negative_prompt"),
    ({"steps": 0}, "steps"), ({"steps": 101}, "steps"), ({"guidance": 21}, "guidance"), ({"seed": -1}, "seed"),
    ({"width": 50}, "width"), ({"height": 4096}, "height"), ({"width": 1024}, "width"),
    ({"num_images": 5}, "num_images"),
    ({"concepts": [{"id": "r0", "weight": 3}]}, "concepts"), ({"concepts": [{"id": "Bad ID"}]}, "concepts"),
    ({"concepts": [{"id": "r0"}, {"id": "r0"}]}, "concepts"),
    ({"concepts": [{"id": c} for c in ("r0", "r1", "r2", "r3")]}, "concepts"),
    ({"concepts": [{"id": f"c{i}"} for i in range(9)]}, "concepts"),
    ({"concepts": [{"id": "r0", "extra": 1}]}, "concepts"), ({"colour": "red"}, "colour"),
    ({"prompt": "a <r1> thing", "concepts": [{"id": "r0"}]}, "prompt"),
]


@pytest.mark.parametrize("change,field", BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_invalid_requests_get_422_naming_the_field(service, change, field):
    resp = service.post({**body("a thing", [], seed=0), **change})
    assert resp.status_code == 422, resp.text
    assert field in {str(p) for d in resp.json()["detail"] for p in d["loc"]}, resp.text


def test_malformed_bodies_and_nan_weights_get_422(service):
    for data in (b"not json", b"[1, 2]", b'{"prompt": "x", "concepts": [{"id": "r0", "weight": NaN}]}'):
        resp = requests.post(service.url + "/v1/generate", data=data, timeout=30,
                             headers={"content-type": "application/json", **service.headers})
        assert resp.status_code == 422, (data, resp.text)


def test_unknown_concept_is_404_and_broken_adapter_422(service, adapter_factory):
    resp = service.post(body("a <nowhere> thing", [("r0", 1.0), ("nowhere", 1.0)], seed=0))
    assert resp.status_code == 404 and resp.json()["concept"] == "nowhere" and "nowhere" in resp.json()["detail"]
    adapter_factory.publish(service.registry, "tampered", seed=5)
    (service.folder("tampered") / DIFFUSERS_WEIGHTS).write_bytes(b"garbage")   # breaks its sha256
    resp = service.post(body("a thing", [("r0", 1.0), ("tampered", 1.0)], seed=0))
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["body", "concepts", 1, "id"], resp.text
    assert "sha256" in resp.json()["detail"][0]["msg"]
    assert service.post(body("a <r0> thing", [("r0", 1.0)], seed=0)).status_code == 200   # service unharmed


def test_overload_gives_503_with_retry_after(service):
    slow = body("a thing", [], seed=0, steps=100, width=128, height=128)
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda b: service.post(b, tight=True), [slow] * 6))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, [r.text for r in responses]
    rejected = [r for r in responses if r.status_code == 503]
    assert len(rejected) >= 3, codes       # 1 in the replica and 1 queued at most; the rest refused at once
    missing = [f"{r.status_code} {dict(r.headers)} {r.text}" for r in rejected if not r.headers.get("retry-after")]
    assert not missing, "\n".join(missing)
    assert any("capacity" in r.json()["detail"] for r in rejected), [r.text for r in rejected]
    time.sleep(3.0)      # let the tight replica finish what it started


def test_a_render_past_the_request_timeout_gives_503(service):
    # alone on the tight app (1 s timeout): 4 images x 100 steps at 256 px cannot finish in a second
    heavy = body("a thing", [], seed=0, steps=100, width=256, height=256, num_images=4)
    resp = service.post(heavy, tight=True)
    assert resp.status_code == 503, resp.text
    assert resp.headers.get("retry-after"), dict(resp.headers)
    assert "no answer within" in resp.json()["detail"], resp.text
    time.sleep(3.0)      # the cancelled render stops at its next step; leave the replica idle


def test_openapi_documents_every_field(service):
    spec = requests.get(service.url + "/openapi.json", timeout=30).json()
    assert {"/v1/generate", "/v1/concepts", "/healthz"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    undocumented = [f"{name}.{prop}" for name in SCHEMAS for prop, s in schemas[name]["properties"].items()
                    if not s.get("description")]
    assert not undocumented, undocumented
    req = schemas["GenerateRequest"]["properties"]
    assert req["steps"]["maximum"] == 100 and req["prompt"]["maxLength"] == 1000
    assert {"401", "403", "404", "422", "429", "503"} <= set(spec["paths"]["/v1/generate"]["post"]["responses"])
    for path, method in (("/v1/generate", "post"), ("/v1/concepts", "get")):
        assert spec["paths"][path][method]["security"] == [{"bearer": []}], path
    assert "security" not in spec["paths"]["/healthz"]["get"]
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "purecc token create" in scheme["description"]
    assert json.dumps(spec)   # serialisable
