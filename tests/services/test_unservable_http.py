"""Bad registry entries over HTTP: never a 500, never a broken listing, never a server path.

One small Serve app on 127.0.0.1 over a registry holding one good concept and one of each kind of
bad entry; ``GET /v1/concepts`` lists only the good one, and every request naming a bad one is
answered 404 (its entry cannot be served) or 422 (its files cannot be loaded), with the reason.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import requests
from safetensors.torch import load, save

from purecc.adapter_files import DIFFUSERS_WEIGHTS, MANIFEST
from purecc.fileio import sha256_bytes
from purecc.registry import AdapterRegistry
from service_helpers import bearer, make_token, roomy_auth

pytestmark = [pytest.mark.ray, pytest.mark.service]

AUTH: dict[str, str] = {}     # the bearer header of the fixture's token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set(folder: Path, name: str, data: bytes) -> None:
    """Replace a file and make the manifest's sha256 match it again."""
    (folder / name).write_bytes(data)
    m = json.loads((folder / MANIFEST).read_text())
    m["files"][name] = sha256_bytes(data)
    (folder / MANIFEST).write_text(json.dumps(m))


def _damage(reg: AdapterRegistry) -> dict[str, tuple[int, str]]:
    """Damage one concept per case; returns {concept: (expected status, words in the answer)}."""
    def folder(cid: str) -> Path:
        return Path(reg.path_of(cid))

    (folder("badjson") / MANIFEST).write_text("{oops")
    m = json.loads((folder("escape") / MANIFEST).read_text())
    m["files"]["../../../etc/passwd"] = "0" * 64
    (folder("escape") / MANIFEST).write_text(json.dumps(m))
    m = json.loads((folder("liar") / MANIFEST).read_text())
    (folder("liar") / MANIFEST).write_text(json.dumps({**m, "concept_id": "good"}))
    m = json.loads((folder("longtrig") / MANIFEST).read_text())
    (folder("longtrig") / MANIFEST).write_text(json.dumps({**m, "trigger": "t" * 500}))
    _set(folder("pickled"), DIFFUSERS_WEIGHTS, pickle.dumps({"w": [1.0]}, protocol=4))
    _set(folder("truncated"), DIFFUSERS_WEIGHTS, (folder("truncated") / DIFFUSERS_WEIGHTS).read_bytes()[:-9])
    _set(folder("hugehdr"), DIFFUSERS_WEIGHTS, (1 << 50).to_bytes(8, "little") + b"{}")
    w = load((folder("nanny") / DIFFUSERS_WEIGHTS).read_bytes())
    w[sorted(w)[0]][0, 0] = float("nan")
    _set(folder("nanny"), DIFFUSERS_WEIGHTS, save(w))
    target = folder("linked") / DIFFUSERS_WEIGHTS
    shutil.copy(target, target.with_name("elsewhere.bin"))
    target.unlink()
    os.symlink(target.with_name("elsewhere.bin"), target)
    return {"badjson": (404, "not valid JSON"), "escape": (404, "not a plain file name"),
            "liar": (404, "names concept 'good'"), "longtrig": (404, "trigger"),
            "linked": (404, "not a regular file"), "pickled": (422, "is a pickle"),
            "truncated": (422, "truncated"), "hugehdr": (422, "exceeds"), "nanny": (422, "not finite")}


@pytest.fixture(scope="module")
def service(tiny_model_dir, adapter_factory, tmp_path_factory):
    from cluster.local_ray import start_local_ray
    from services.app import build_app
    from services.config import ServiceConfig

    work = tmp_path_factory.mktemp("unservable")
    reg = AdapterRegistry(work / "registry")
    names = ["good", "badjson", "escape", "liar", "longtrig", "linked", "pickled", "truncated", "hugehdr", "nanny"]
    for i, cid in enumerate(names):
        adapter_factory.publish(reg, cid, seed=900 + i)
    cases = _damage(reg)
    temp_dir = Path(f"/tmp/pcbad-{os.getpid()}")
    ray = start_local_ray(1, temp_dir=temp_dir)
    from ray import serve

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        tokens = work / "tokens.json"
        AUTH.update(bearer(make_token(tokens, "viewer", "generate")))
        serve.run(build_app(ServiceConfig(model=str(tiny_model_dir), registry=str(reg.root), slots=2,
                                          cpus_per_replica=0.5, warmup=False, batch_wait_s=0.0,
                                          catalog_ttl_s=0.0, auth=roomy_auth(tokens))), name="bad", route_prefix="/")
        yield f"http://127.0.0.1:{port}", cases, work
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def generate(url: str, concepts: list[str]) -> requests.Response:
    body = {"prompt": "a thing", "concepts": [{"id": c, "weight": 1.0} for c in concepts], "seed": 0,
            "steps": 2, "guidance": 5.0, "width": 64, "height": 64}
    return requests.post(url + "/v1/generate", json=body, timeout=120, headers=AUTH)


def test_the_listing_holds_only_servable_concepts(service):
    url, _, _ = service
    for _ in range(2):
        resp = requests.get(url + "/v1/concepts", timeout=60, headers=AUTH)
        assert resp.status_code == 200, resp.text
        assert [c["id"] for c in resp.json()["concepts"]] == ["good"]


def test_every_bad_concept_is_a_clear_4xx(service):
    url, cases, work = service
    for cid, (status, words) in cases.items():
        for concepts in ([cid], ["good", cid]):
            resp = generate(url, concepts)
            assert resp.status_code == status, (cid, resp.status_code, resp.text)
            assert words in resp.text and cid in resp.text, (cid, resp.text)
            assert str(work) not in resp.text and "/tmp" not in resp.text, (cid, resp.text)
    assert generate(url, ["good"]).status_code == 200               # the service is unharmed
