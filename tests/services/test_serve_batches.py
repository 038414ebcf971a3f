"""Concept batches over HTTP: submit, watch, serve; every problem of a bad batch in one 422.

One local Ray (2 CPUs on 127.0.0.1) and Serve with two applications of the tiny model:
- ``main`` at / with a storage root (the sample concepts copied under ``<storage>/data/alice/``, the
  data area of the token's owner; the registry is the same folder);
- ``plain`` at /plain without one (the batch routes answer 404).

The main batch trains two concepts in one pack for a few steps per stage (two Ray Train runs),
driven by the detached driver actor that the submission starts.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from service_helpers import bearer, free_port, make_token, roomy_auth
from services.client import ServiceClient, ServiceError

pytestmark = [pytest.mark.ray, pytest.mark.service]

TRIGGERS = {"checkered-star": "zqx", "striped-circle": "vlk"}
DEFAULTS = {"resolution": 64, "stage1": {"steps": 4, "checkpoint_every": 2, "grad_accum": 1, "lr": 2e-3},
            "stage2": {"steps": 3, "checkpoint_every": 2, "lr": 1e-3}, "validation_prompts": ["a [v] on a beach"]}
TRAIN_TIMEOUT_S = 240


OWNER = "alice"


@dataclass
class BatchService:
    url: str
    storage: Path
    outside: Path
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)

    def post(self, body: dict, path: str = "/v1/batches") -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=60, headers=self.headers)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30, headers=self.headers)

    def client(self) -> ServiceClient:
        return ServiceClient(self.url, token=self.token, timeout=60)


def batch(name: str, ids=tuple(TRIGGERS), **extra) -> dict:
    return {"name": name, "resources": {"cpus_per_worker": 0.5, "concepts_per_pack": 2, "max_concurrent": 1,
                                        "max_attempts": 1},
            "defaults": DEFAULTS, "validation": {"steps": 2},
            "concepts": [{"id": cid, "data": f"{cid}/manifest.csv", "trigger": TRIGGERS[cid]} for cid in ids],
            **extra}


@pytest.fixture(scope="module")
def batch_service(tiny_model_dir, sample_manifests, tmp_path_factory):
    from cluster.local_ray import start_local_ray
    from services.app import build_app
    from services.config import ServiceConfig

    work = tmp_path_factory.mktemp("batches")
    storage = work / "storage"
    for cid in TRIGGERS:
        shutil.copytree(sample_manifests[cid].parent, storage / "data" / OWNER / cid)
    outside = work / "outside"
    shutil.copytree(sample_manifests["checkered-star"].parent, outside)
    (storage / "data" / OWNER / "escape").symlink_to(outside, target_is_directory=True)
    tokens = storage / "auth" / "tokens.json"
    token = make_token(tokens, OWNER)
    temp_dir = Path(f"/tmp/pcbat-{os.getpid()}")
    ray = start_local_ray(2, temp_dir=temp_dir)
    from ray import serve

    port = free_port()
    common = dict(model=str(tiny_model_dir), cpus_per_replica=0.5, warmup=False, slots=2, auth=roomy_auth(tokens))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServiceConfig(**common, registry=str(work / "registry"))), name="plain",
                  route_prefix="/plain")
        serve.run(build_app(ServiceConfig(**common, storage=str(storage))), name="main", route_prefix="/")
        yield BatchService(f"http://127.0.0.1:{port}", storage, outside, token)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_done(client: ServiceClient, name: str, timeout: float) -> tuple[dict, list[tuple]]:
    """Poll the batch until no job is active; returns the last status and the (state, stage, step) seen."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        status = client.batch_status(name)
        for j in status["jobs"]:
            point = (j["id"], j["state"], j["stage"], j["step"])
            if point not in seen:
                seen.append(point)
        if status["done"]:
            return status, seen
        time.sleep(0.5)
    raise AssertionError(f"batch {name} not done after {timeout} s: {status}")


def test_a_batch_posted_over_http_trains_publishes_and_is_served(batch_service):
    client = batch_service.client()
    resp = batch_service.post(batch("shapes"))
    assert resp.status_code == 202, resp.text
    assert resp.headers["location"] == "/v1/batches/shapes"
    first = resp.json()
    assert (first["batch"], first["added"], first["driver"]) == ("shapes", list(TRIGGERS), "started"), first
    assert not first["done"] and {j["state"] for j in first["jobs"]} <= {"queued", "stage1"}

    status, seen = wait_done(client, "shapes", TRAIN_TIMEOUT_S)
    print("progress seen:", seen)
    assert status["counts"] == {"published": 2}, status
    for job in status["jobs"]:
        assert job["adapter"] and job["adapter"].startswith(f"adapters/{job['id']}"), job     # storage-relative
        assert (batch_service.storage / job["adapter"]).is_dir() and str(batch_service.storage) not in str(job)
        assert job["published_at"] >= job["stage2_started"] >= job["stage1_ended"] >= job["stage1_started"], job
        assert (job["stage"], job["step"], job["total"]) == (2, 3, 3), job
        assert job["error"] is None and job["loss"] is not None
    assert any(state == "stage1" for _, state, _, _ in seen) or any(s == "stage2" for _, s, _, _ in seen), seen

    # each job's loss curves (pushed by the workers, kept in the ledger) and its validation images
    for cid, trigger in TRIGGERS.items():
        loss = batch_service.get(f"/v1/batches/shapes/concepts/{cid}/loss")
        assert loss.status_code == 200, loss.text
        stages = loss.json()["stages"]
        assert sorted(stages) == ["1", "2"] and loss.json()["state"] == "published", loss.json()
        for stage, steps in (("1", 4), ("2", 3)):
            curve = stages[stage]
            assert curve["steps"] == steps and curve["bucket"] == 1, curve
            assert [p[:2] for p in curve["points"]] == [[i, i] for i in range(1, steps + 1)], curve
            assert all(p[2] > 0 for p in curve["points"]), curve
        listed = batch_service.get(f"/v1/concepts/{cid}/validation")
        assert listed.status_code == 200, listed.text
        images = listed.json()["images"]
        assert [(i["stage"], i["name"], i["prompt"]) for i in images] == [
            (1, "00.png", f"a {trigger} on a beach"), (2, "00.png", f"a {trigger} on a beach")], images
        pngs = [batch_service.get(i["url"]) for i in images]
        assert all(r.status_code == 200 and r.headers["content-type"] == "image/png" for r in pngs)
        assert pngs[0].content.startswith(b"\x89PNG") and pngs[0].content != pngs[1].content
        assert str(batch_service.storage) not in listed.text
    for path in ("/v1/batches/shapes/concepts/nowhere/loss", "/v1/batches/nope/concepts/checkered-star/loss",
                 "/v1/concepts/checkered-star/validation/3/00.png", "/v1/concepts/checkered-star/validation/1/01.png",
                 "/v1/concepts/nowhere/validation"):
        resp = batch_service.get(path)
        assert resp.status_code in (404, 422) and "detail" in resp.json(), (path, resp.text)
        assert str(batch_service.storage) not in resp.text
    assert batch_service.get("/v1/concepts/checkered-star/validation/1/01.png").status_code == 404
    assert batch_service.get("/v1/concepts/checkered-star/validation/1/..%2F..%2Fx.png").status_code in (404, 422)

    # servable at once, by the same service, without a restart
    served = {c["id"] for c in client.concepts()}
    assert set(TRIGGERS) <= served, served
    result = client.generate("a <checkered-star> star beside a <striped-circle> circle", seed=3, steps=2,
                             concepts=[("checkered-star", 1.0), ("striped-circle", 1.0)], width=64, height=64)
    assert result.metadata["prompt"] == "a zqx star beside a vlk circle" and len(result.images) == 1

    # idempotent: the same batch again records nothing and starts no driver
    again = client.submit_batch(batch("shapes"))
    assert (again["unchanged"], again["added"], again["driver"], again["done"]) == (list(TRIGGERS), [], "idle", True)
    # a changed concept without replace: 409 naming it, nothing recorded
    changed = batch("shapes", ids=["striped-circle"])
    changed["concepts"][0]["trigger"] = "qqv"
    resp = batch_service.post(changed)
    assert resp.status_code == 409 and resp.json()["concept"] == "striped-circle", resp.text
    assert "striped-circle" in resp.json()["detail"] and "replace" in resp.json()["detail"]
    listed = client.batches()
    assert [(b["batch"], b["counts"], b["done"]) for b in listed] == [("shapes", {"published": 2}, True)], listed


def test_a_bad_batch_gets_one_422_listing_every_problem(batch_service):
    body = batch("broken", ids=["checkered-star"] * 7)
    concepts = body["concepts"]
    for i, c in enumerate(concepts):
        c["id"] = f"c{i}"
    concepts[0]["data"] = str(batch_service.storage / "data" / OWNER / "checkered-star" / "manifest.csv")  # absolute
    concepts[1]["data"] = "../outside/manifest.csv"                                              # .. escape
    concepts[2]["colour"] = "red"                                                                # unknown field
    concepts[3]["id"] = "Not An Id"                                                              # bad id
    concepts[4]["data"] = "nowhere/manifest.csv"                                                 # no manifest
    concepts[5]["data"] = "escape/manifest.csv"                                                  # symlink out
    concepts[6]["data"] = "x" * 300 + "/manifest.csv"                              # a name the file system refuses
    body["storage"] = "/elsewhere"                                                               # service's own
    resp = batch_service.post(body)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    print("\n".join(f"{d['loc']}: {d['msg']}" for d in detail))
    problems = {tuple(d["loc"]): d["msg"] for d in detail}
    assert set(problems) == {("body", "storage"), ("body", "concepts", 0, "data"), ("body", "concepts", 1, "data"),
                             ("body", "concepts", 2, "colour"), ("body", "concepts", 3, "id"),
                             ("body", "concepts", 4, "data"), ("body", "concepts", 5, "data"),
                             ("body", "concepts", 6, "data")}, detail
    assert "absolute" in problems[("body", "concepts", 0, "data")]
    assert "'..'" in problems[("body", "concepts", 1, "data")]
    assert "does not exist" in problems[("body", "concepts", 4, "data")]
    assert "outside" in problems[("body", "concepts", 5, "data")]
    assert all({"loc", "msg", "type"} <= set(d) for d in detail)
    assert str(batch_service.outside) not in resp.text       # nothing outside the data folder is named
    assert batch_service.get("/v1/batches/broken").status_code == 404  # nothing recorded


def test_a_batch_no_node_can_place_is_refused_at_submit(batch_service):
    body = batch("too-big", ids=["checkered-star"])
    body["resources"] = {"gpus_per_worker": 2}
    resp = batch_service.post(body)
    assert resp.status_code == 422, resp.text
    [problem] = resp.json()["detail"]
    assert problem["loc"] == ["body", "resources", "gpus_per_worker"] and "no node" in problem["msg"], problem
    assert batch_service.get("/v1/batches/too-big").status_code == 404        # nothing recorded


@pytest.mark.parametrize("data,code", [(b"not json", 422), (b"[1]", 422), (b'{"name": NaN}', 422),
                                       (b" " * (1024 * 1024 + 1), 413)], ids=["text", "list", "nan", "huge"])
def test_malformed_batch_bodies_are_4xx(batch_service, data, code):
    resp = requests.post(batch_service.url + "/v1/batches", data=data, timeout=30,
                         headers={"content-type": "application/json", **batch_service.headers})
    assert resp.status_code == code, resp.text


def test_unknown_batch_is_404_and_a_bad_name_422(batch_service):
    resp = batch_service.get("/v1/batches/never-submitted")
    assert resp.status_code == 404 and "never-submitted" in resp.json()["detail"], resp.text
    assert batch_service.get("/v1/batches/Bad%20Name").status_code == 422
    with pytest.raises(ServiceError) as err:
        batch_service.client().batch_status("never-submitted")
    assert err.value.status == 404


def test_a_service_without_storage_answers_404(batch_service):
    plain = batch_service.url + "/plain"
    for method, path in (("POST", "/v1/batches"), ("GET", "/v1/batches/shapes"), ("GET", "/v1/batches"),
                         ("POST", "/v1/batches/shapes/cancel")):
        resp = requests.request(method, plain + path, json=batch("shapes") if method == "POST" else None, timeout=30,
                                headers=batch_service.headers)
        assert resp.status_code == 404, resp.text
        assert "not enabled" in resp.json()["detail"]


def test_openapi_documents_the_batch_api(batch_service):
    spec = requests.get(batch_service.url + "/openapi.json", timeout=30).json()
    assert {"/v1/batches", "/v1/batches/{name}", "/v1/batches/{name}/cancel"} <= set(spec["paths"])
    post = spec["paths"]["/v1/batches"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/BatchRequest"
    assert {"202", "401", "403", "404", "409", "413", "422", "429", "503"} <= set(post["responses"])
    assert post["security"] == [{"bearer": []}] and "bearer" in spec["components"]["securitySchemes"]
    assert not [p for p in post.get("parameters", []) if p["in"] == "query"], post     # no stray `request`
    schemas = spec["components"]["schemas"]
    names = ("BatchRequest", "BatchConcept", "BatchOverrides", "BatchStage", "BatchResources", "BatchValidation",
             "BatchSubmitted", "BatchStatus", "JobStatus", "BatchList", "BatchSummary", "BatchCancelled")
    undocumented = [f"{n}.{p}" for n in names for p, s in schemas[n]["properties"].items() if not s.get("description")]
    assert not undocumented, undocumented
    assert schemas["BatchRequest"]["properties"]["concepts"]["maxItems"] == 32
    assert "base_model" not in schemas["BatchRequest"]["properties"]


def test_storage_is_the_registry_and_serve_takes_it(tmp_path, monkeypatch):
    from purecc.cli import build_parser
    from services.cli import config_from_args
    from services.config import ServiceConfig

    assert ServiceConfig(model="/m", storage="/s").registry == "/s"
    assert ServiceConfig(model="/m", storage="/s", registry="/s/").storage == "/s"
    for bad, field in (({}, "registry"), ({"storage": "/s", "registry": "/r"}, "registry"),
                       ({"storage": "s3://b/p"}, "storage")):
        with pytest.raises(ValueError, match=field):
            ServiceConfig(model="/m", **bad)
    monkeypatch.chdir(tmp_path)
    cfg = config_from_args(build_parser().parse_args(["serve", "--model", "/m", "--storage", "store",
                                                      "--gpus-per-replica", "0"]))
    assert cfg.storage == cfg.registry == str((tmp_path / "store").resolve())


def test_a_service_started_on_unfinished_jobs_resumes_them(batch_service, tiny_model_dir, sample_manifests,
                                                           tmp_path):
    """Jobs recorded before a "restart" (nobody drives them) start training when a service starts on that
    storage, without a new submission."""
    from ray import serve

    from cluster.ledger import JobLedger
    from services.app import build_app
    from services.batches import LEDGER_FILE, batch_from_request
    from services.config import ServiceConfig

    storage = tmp_path / "storage"
    shutil.copytree(sample_manifests["checkered-star"].parent, storage / "data" / "checkered-star")
    valid, _ = batch_from_request(batch("left-over", ids=["checkered-star"]), base_model=str(tiny_model_dir),
                                  storage=storage)
    with JobLedger(storage / LEDGER_FILE) as led:
        led.submit(valid.jobs(), owner=OWNER)
        assert led.live_driver() is None and led.get("checkered-star").state == "queued"
    tokens = storage / "auth" / "tokens.json"
    make_token(tokens, OWNER)
    serve.run(build_app(ServiceConfig(model=str(tiny_model_dir), storage=str(storage), cpus_per_replica=0.5,
                                      warmup=False, slots=2, auth=roomy_auth(tokens))),
              name="restarted", route_prefix="/restarted")
    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        with JobLedger(storage / LEDGER_FILE) as led:
            while led.get("checkered-star").state == "queued":
                assert time.monotonic() < deadline, "the queued job never started"
                time.sleep(0.5)
            assert led.events(kind="driver-start"), led.events()
            led.request_cancel("checkered-star")        # enough: it ran without a submission
    finally:
        serve.delete("restarted")
