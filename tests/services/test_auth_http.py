"""Tokens, scopes, ownership, rate limits and quotas over real HTTP (local Ray, Serve, the tiny model).

Two applications share one Serve instance:
- ``main`` at / : storage with tokens for alice and bob (generate + submit), carol (generate only) and
  root (admin); limits the tests never reach;
- ``tight`` at /tight : another storage, 2 requests per burst at 6 per minute, 1 queued concept per owner.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from PIL import Image

from purecc.cli import main as purecc_main
from purecc.registry import AdapterRegistry
from service_helpers import bearer, free_port, make_token, roomy_auth
from services.auth import Authority, AuthSettings, RateLimiter, TokenStore

TRIGGERS = {"checkered-star": "zqx", "striped-circle": "vlk"}
STEPS = {"resolution": 64, "stage1": {"steps": 2, "checkpoint_every": 1}, "stage2": {"steps": 2}}


def batch(name: str, ids=("checkered-star",), **extra) -> dict:
    return {"name": name, "resources": {"cpus_per_worker": 0.5, "max_concurrent": 1, "max_attempts": 1},
            "defaults": STEPS, "validation": {"steps": 1},
            "concepts": [{"id": cid, "data": f"{cid}/manifest.csv", "trigger": TRIGGERS[cid]} for cid in ids],
            **extra}


# ----- the token file and the CLI (no Ray) -----------------------------------------------------
def test_tokens_are_stored_hashed_and_verified(tmp_path):
    store = TokenStore(tmp_path / "auth" / "tokens.json")
    rec, token = store.create("alice", ["generate", "submit"])
    _, tok_id, secret = token.split("_", 2)
    assert token.startswith("pcc_") and tok_id == rec.id and len(secret) >= 40
    text = store.path.read_text()
    assert secret not in text and rec.secret_sha256 in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert store.verify(token).owner == "alice"
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None      # wrong secret
    assert store.verify(f"pcc_{'0' * 12}_{secret}") is None and store.verify("garbage") is None
    store.revoke(rec.id)
    assert store.verify(token) is None and store.list()[0].revoked_at is not None
    with pytest.raises(ValueError, match="scopes"):
        store.create("alice", ["root"])
    with pytest.raises(ValueError, match="owner"):
        store.create("../etc", ["generate"])


def test_the_token_bucket_allows_its_burst_then_its_rate():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    assert [limiter.take("t") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("t") == pytest.approx(1.0) and limiter.take("other") == 0.0
    now[0] = 1.0                              # one request a second comes back
    assert limiter.take("t") == 0.0 and limiter.take("t") > 0


def test_without_a_token_file_no_token_is_valid():
    from fastapi import HTTPException
    from fastapi.security import HTTPAuthorizationCredentials

    authority = Authority(AuthSettings(), None)
    with pytest.raises(HTTPException) as err:
        authority.authenticate(HTTPAuthorizationCredentials(scheme="Bearer", credentials="pcc_x_y"), "generate")
    assert err.value.status_code == 401 and "no token file" in err.value.detail
    off = Authority(AuthSettings(enabled=False), None).authenticate(None, "submit")
    assert off.admin and off.owner == "local"


def test_token_cli_round_trip(tmp_path, capsys):
    storage = tmp_path / "storage"
    assert purecc_main(["token", "create", "--storage", str(storage), "--owner", "alice", "--scope", "generate",
                        "--scope", "submit"]) == 0
    token = capsys.readouterr().out.strip()
    store = TokenStore(storage / "auth" / "tokens.json")
    rec = store.verify(token)
    assert rec is not None and rec.scopes == ("generate", "submit")
    assert purecc_main(["token", "list", "--storage", str(storage), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["id"], t["owner"], t["revoked_at"]) for t in listed] == [(rec.id, "alice", None)]
    assert token.split("_", 2)[2] not in json.dumps(listed)
    assert purecc_main(["token", "revoke", "--storage", str(storage), rec.id]) == 0
    assert store.verify(token) is None
    assert purecc_main(["token", "revoke", "--storage", str(storage), "ffffffffffff"]) == 1
    assert "no token" in capsys.readouterr().err


def test_no_auth_is_refused_off_loopback(tiny_model_dir, capsys):
    code = purecc_main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--no-auth"])
    assert code == 2 and "--no-auth is only allowed with --host 127.0.0.1" in capsys.readouterr().err


# ----- over HTTP --------------------------------------------------------------------------------
@dataclass
class AuthService:
    url: str
    storage: Path
    tokens: Path
    token: dict[str, str]

    def call(self, who: str | None, method: str, path: str, **kwargs) -> requests.Response:
        headers = bearer(self.token[who]) if who else {}
        return requests.request(method, self.url + path, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def auth_service(tiny_model_dir, sample_manifests, tmp_path_factory):
    from cluster.local_ray import start_local_ray
    from services.app import build_app
    from services.config import ServiceConfig

    work = tmp_path_factory.mktemp("auth")
    storage, tight = work / "storage", work / "tight"
    for root, owner in ((storage, "alice"), (storage, "bob"), (tight, "dave"), (tight, "erin")):
        for cid in TRIGGERS:
            shutil.copytree(sample_manifests[cid].parent, root / "data" / owner / cid)
    tokens = storage / "auth" / "tokens.json"
    token = {who: make_token(tokens, who, *scopes) for who, scopes in (
        ("alice", ()), ("bob", ()), ("carol", ("generate",)), ("root", ("admin",)))}
    tight_tokens = tight / "auth" / "tokens.json"
    token.update({who: make_token(tight_tokens, who) for who in ("dave", "erin")})
    temp_dir = Path(f"/tmp/pcauth-{os.getpid()}")
    ray = start_local_ray(2, temp_dir=temp_dir)
    from ray import serve

    port = free_port()
    common = dict(model=str(tiny_model_dir), cpus_per_replica=0.5, warmup=False, slots=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        limits = AuthSettings(requests_per_minute=6, burst=2, max_queued_concepts=1, quota_retry_after_s=42)
        serve.run(build_app(ServiceConfig(**common, storage=str(tight), auth=limits)), name="tight",
                  route_prefix="/tight")
        serve.run(build_app(ServiceConfig(**common, storage=str(storage), auth=roomy_auth(tokens))), name="main",
                  route_prefix="/")
        yield AuthService(f"http://127.0.0.1:{port}", storage, tokens, token)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.service
def test_a_second_token_cannot_read_replace_or_cancel_the_first_tokens_batches(auth_service, adapter_factory):
    svc = auth_service
    resp = svc.call("alice", "POST", "/v1/batches", json=batch("alice-shapes"))
    assert resp.status_code == 202, resp.text
    # bob: alice's batch does not exist for him
    resp = svc.call("bob", "GET", "/v1/batches/alice-shapes")
    assert resp.status_code == 404 and "alice-shapes" in resp.json()["detail"], resp.text
    assert svc.call("bob", "GET", "/v1/batches").json() == {"batches": []}
    # ... he cannot take her concept id, not even with replace, nor her batch name
    for body in (batch("bob-shapes", replace=True), batch("bob-shapes")):
        body["concepts"][0]["trigger"] = "bbq"
        resp = svc.call("bob", "POST", "/v1/batches", json=body)
        assert resp.status_code == 403 and resp.json()["concept"] == "checkered-star", resp.text
        assert "checkered-star" in resp.json()["detail"] and "another owner" in resp.json()["detail"]
    resp = svc.call("bob", "POST", "/v1/batches", json=batch("alice-shapes", ids=["striped-circle"]))
    assert resp.status_code == 403 and "alice-shapes" in resp.json()["detail"], resp.text
    # ... nor cancel her batch, nor read her data
    resp = svc.call("bob", "POST", "/v1/batches/alice-shapes/cancel")
    assert resp.status_code == 403, resp.text
    escape = batch("bob-escape", ids=["striped-circle"])
    escape["concepts"][0]["data"] = "../alice/striped-circle/manifest.csv"
    resp = svc.call("bob", "POST", "/v1/batches", json=escape)
    assert resp.status_code == 422 and "'..'" in resp.text, resp.text
    assert svc.call("bob", "GET", "/v1/batches/bob-shapes").status_code == 404         # nothing recorded
    mine = svc.call("alice", "GET", "/v1/batches/alice-shapes").json()
    assert not any(j["cancel_requested"] for j in mine["jobs"]), mine
    # identical content under another batch name joins it and leaves it in the first
    again = svc.call("alice", "POST", "/v1/batches", json=batch("alice-again"))
    assert again.status_code == 202 and again.json()["unchanged"] == ["checkered-star"], again.text
    for name in ("alice-shapes", "alice-again"):
        assert [j["id"] for j in svc.call("alice", "GET", f"/v1/batches/{name}").json()["jobs"]] == ["checkered-star"]
    assert {b["batch"] for b in svc.call("alice", "GET", "/v1/batches").json()["batches"]} == {
        "alice-shapes", "alice-again"}
    # the admin sees every batch (cancelling and replacing: the next test); alice cancels her own
    assert svc.call("root", "GET", "/v1/batches/alice-shapes").status_code == 200
    cancelled = svc.call("alice", "POST", "/v1/batches/alice-shapes/cancel")
    assert cancelled.status_code == 200 and "checkered-star" in cancelled.json()["messages"][0], cancelled.text
    assert str(svc.storage) not in cancelled.text and str(svc.storage) not in mine.__repr__()
    # her published concept is hers: bob neither lists nor composes it; a concept without owner is everyone's
    registry = AdapterRegistry(svc.storage)
    folder = adapter_factory.write("checkered-star", seed=3, trigger="zqx")
    (folder / "validation" / "stage2").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / "validation" / "stage2" / "00.png")
    registry.publish("checkered-star", folder)
    adapter_factory.publish(registry, "public-thing", seed=4, trigger="pbt")
    seen = {who: {c["id"] for c in svc.call(who, "GET", "/v1/concepts").json()["concepts"]} for who in ("alice", "bob")}
    assert seen == {"alice": {"checkered-star", "public-thing"}, "bob": {"public-thing"}}, seen
    body = {"prompt": "a <checkered-star>", "concepts": [{"id": "checkered-star"}], "steps": 1, "width": 32, "height": 32}
    resp = svc.call("bob", "POST", "/v1/generate", json=body)
    assert resp.status_code == 404 and resp.json()["concept"] == "checkered-star", resp.text
    assert svc.call("alice", "POST", "/v1/generate", json=body).status_code == 200
    # nor its validation images, nor the loss curves of her batch's jobs
    images = svc.call("alice", "GET", "/v1/concepts/checkered-star/validation")
    assert images.status_code == 200 and [i["name"] for i in images.json()["images"]] == ["00.png"], images.text
    assert images.json()["images"][0]["prompt"] is None                   # published without prompts.json
    png = svc.call("alice", "GET", images.json()["images"][0]["url"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG"), png.text
    for path in ("/v1/concepts/checkered-star/validation", images.json()["images"][0]["url"],
                 "/v1/batches/alice-shapes/concepts/checkered-star/loss"):
        resp = svc.call("bob", "GET", path)
        assert resp.status_code == 404, (path, resp.text)            # as unknown as a concept never published
    assert svc.call("alice", "GET", "/v1/batches/alice-shapes/concepts/checkered-star/loss").status_code == 200
    assert svc.call("root", "GET", "/v1/batches/alice-shapes/concepts/checkered-star/loss").status_code == 200


@pytest.mark.ray
@pytest.mark.service
def test_the_admin_may_cancel_and_replace_another_owners_batch_and_concept(auth_service):
    from cluster.ledger import ACTIVE, JobLedger

    svc = auth_service
    resp = svc.call("alice", "POST", "/v1/batches", json=batch("alice-circles", ids=["striped-circle"]))
    assert resp.status_code == 202 and resp.json()["added"] == ["striped-circle"], resp.text
    assert svc.call("bob", "POST", "/v1/batches/alice-circles/cancel").status_code == 403
    # root cancels alice's batch: 200, and the ledger records the cancellation, alice still its owner
    cancelled = svc.call("root", "POST", "/v1/batches/alice-circles/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["messages"][0].startswith("striped-circle: cancel"), cancelled.text
    assert str(svc.storage) not in cancelled.text
    deadline, state = time.monotonic() + 180, None
    while time.monotonic() < deadline and state != "cancelled":     # a training job stops at its next step
        state = svc.call("root", "GET", "/v1/batches/alice-circles").json()["jobs"][0]["state"]
        time.sleep(0.5)
    assert state == "cancelled", state
    mine = svc.call("alice", "GET", "/v1/batches/alice-circles").json()["jobs"][0]
    assert mine["state"] == "cancelled" and mine["cancel_requested"], mine
    with JobLedger(svc.storage / "ledger.sqlite") as led:
        before = led.get("striped-circle")
        kinds = [e["kind"] for e in led.events("striped-circle")]
        assert "cancelled" in kinds and led.owners(["striped-circle"]) == {"striped-circle": "alice"}, kinds
        assert led.batch_owner("alice-circles") == "alice"
    # root replaces alice's concept, in her batch, from her data (an admin's data area is every owner's)
    body = batch("alice-circles", ids=["striped-circle"], replace=True)
    body["concepts"][0].update(trigger="vlq", data="alice/striped-circle/manifest.csv")
    bob_body = {**body, "name": "bob-circles",
                "concepts": [{**body["concepts"][0], "data": "striped-circle/manifest.csv"}]}   # his copy
    bob_try = svc.call("bob", "POST", "/v1/batches", json=bob_body)
    assert bob_try.status_code == 403 and bob_try.json()["concept"] == "striped-circle", bob_try.text
    replaced = svc.call("root", "POST", "/v1/batches", json=body)
    assert replaced.status_code == 202 and replaced.json()["replaced"] == ["striped-circle"], replaced.text
    with JobLedger(svc.storage / "ledger.sqlite") as led:
        after = led.get("striped-circle")
        kinds = [e["kind"] for e in led.events("striped-circle")]
        assert after.spec.trigger == "vlq" and after.generation == before.generation + 1
        assert after.content_hash != before.content_hash and after.state in ACTIVE, after.state
        assert "replaced" in kinds and kinds.index("replaced") > kinds.index("cancelled"), kinds
        assert led.owners(["striped-circle"]) == {"striped-circle": "alice"}      # still hers, retrained
        assert led.batch_owner("alice-circles") == "alice"
    assert svc.call("alice", "GET", "/v1/batches/alice-circles").json()["jobs"][0]["state"] in ACTIVE
    assert svc.call("bob", "GET", "/v1/batches/alice-circles").status_code == 404
    # and cancels the retraining too (nothing left training for the tests after this one)
    again = svc.call("root", "POST", "/v1/batches/alice-circles/cancel")
    assert again.status_code == 200 and again.json()["messages"][0].startswith("striped-circle: cancel"), again.text


@pytest.mark.ray
@pytest.mark.service
def test_401_and_403_answers(auth_service):
    svc = auth_service
    for who, path in ((None, "/v1/concepts"), (None, "/v1/batches")):
        resp = svc.call(who, "GET", path)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", resp.text
        assert "missing bearer token" in resp.json()["detail"]
    resp = requests.get(svc.url + "/v1/batches", headers={"Authorization": "Bearer pcc_nonsense"}, timeout=30)
    assert resp.status_code == 401 and "invalid token" in resp.json()["detail"], resp.text
    resp = svc.call("carol", "POST", "/v1/batches", json=batch("carols"))
    assert resp.status_code == 403 and "'submit' scope" in resp.json()["detail"], resp.text
    assert svc.call("carol", "GET", "/v1/concepts").status_code == 200
    # revoked on the running service's token file: refused from the next request on
    store = TokenStore(svc.tokens)
    store.revoke(store.verify(svc.token["carol"]).id)
    assert svc.call("carol", "GET", "/v1/concepts").status_code == 401
    for path in ("/healthz", "/openapi.json", "/docs"):
        assert requests.get(svc.url + path, timeout=30).status_code == 200, path


@pytest.mark.ray
@pytest.mark.service
def test_rate_limit_and_quota_answer_429_with_retry_after(auth_service):
    svc = auth_service
    codes = [svc.call("dave", "GET", "/tight/v1/batches") for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429], [r.text for r in codes]
    limited = codes[-1]
    assert 1 <= int(limited.headers["retry-after"]) <= 10 and "rate limit" in limited.json()["detail"], limited.text
    resp = svc.call("erin", "POST", "/tight/v1/batches", json=batch("two", ids=list(TRIGGERS)))
    assert resp.status_code == 429 and resp.headers["retry-after"] == "42", resp.text
    assert "quota" in resp.json()["detail"] and "limit is 1" in resp.json()["detail"]
    assert svc.call("erin", "GET", "/tight/v1/batches/two").status_code == 404                  # nothing recorded
