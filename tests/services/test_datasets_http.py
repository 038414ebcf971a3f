"""Dataset uploads over HTTP: every bound a clear 4xx, owners apart, and upload -> train -> compose.

One local Ray (2 CPUs on 127.0.0.1) and Serve with the tiny model and a storage root; two owners
(alice, bob) with their own tokens. The striped-circle sample is in alice's data area; the checkered-star
images are uploaded. The body bound is lowered to 20 MiB (``LimitSettings.max_upload_bytes``) so the
413 case stays cheap while a 16 MiB + 1 image still reaches the per-image bound.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from PIL import Image

from service_helpers import bearer, free_port, make_token, roomy_auth
from services.client import ServiceClient, ServiceError

pytestmark = [pytest.mark.ray, pytest.mark.service]

UPLOAD_LIMIT = 20 * 1024 * 1024
DEFAULTS = {"resolution": 64, "stage1": {"steps": 4, "checkpoint_every": 2, "grad_accum": 1, "lr": 2e-3},
            "stage2": {"steps": 3, "checkpoint_every": 2, "lr": 1e-3}}
TRAIN_TIMEOUT_S = 300


@dataclass
class UploadService:
    url: str
    storage: Path
    tokens: dict[str, str]
    samples: dict[str, Path]

    def client(self, owner: str = "alice") -> ServiceClient:
        return ServiceClient(self.url, token=self.tokens[owner], timeout=120)

    def upload(self, files: list[tuple[str, bytes]], owner: str = "alice", **form) -> requests.Response:
        return requests.post(self.url + "/v1/datasets", files=[("files", f) for f in files], data=form,
                             headers=bearer(self.tokens[owner]), timeout=120)

    def call(self, method: str, path: str, owner: str = "alice", **kw) -> requests.Response:
        return requests.request(method, self.url + path, headers=bearer(self.tokens[owner]), timeout=60, **kw)


@pytest.fixture(scope="module")
def upload_service(tiny_model_dir, sample_manifests, tmp_path_factory):
    from cluster.local_ray import start_local_ray
    from services.app import build_app
    from services.config import ServiceConfig
    from services.limits import LimitSettings

    storage = tmp_path_factory.mktemp("uploads") / "storage"
    shutil.copytree(sample_manifests["striped-circle"].parent, storage / "data" / "alice" / "striped-circle")
    tokens_file = storage / "auth" / "tokens.json"
    tokens = {owner: make_token(tokens_file, owner) for owner in ("alice", "bob")}
    temp_dir = Path(f"/tmp/pcupl-{os.getpid()}")
    ray = start_local_ray(2, temp_dir=temp_dir)
    from ray import serve

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServiceConfig(model=str(tiny_model_dir), storage=str(storage), cpus_per_replica=0.5,
                                          warmup=False, slots=2, auth=roomy_auth(tokens_file),
                                          limits=LimitSettings(max_upload_bytes=UPLOAD_LIMIT))),
                  name="uploads", route_prefix="/")
        yield UploadService(f"http://127.0.0.1:{port}", storage, tokens,
                            {cid: m.parent for cid, m in sample_manifests.items()})
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ----- test data --------------------------------------------------------------------------------
def png(side: int = 8, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (side, side), 128).save(buf, fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds a few bytes: a decompression bomb's header."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def zipped(entries: dict, **infos) -> bytes:
    """A zip of ``entries`` (name -> bytes, or a ZipInfo-ready (name, bytes, external_attr) via ``infos``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, (data, attr) in infos.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = attr << 16
            zf.writestr(info, data)
    return buf.getvalue()


def zip_with_absolute_entry() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.png", png())
    raw = buf.getvalue()
    return raw.replace(b"x.png", b"/x.pn")       # same length: the central directory names an absolute path


CASES = {
    "too-many-files": ([(f"{i}.png", png(4)) for i in range(101)], {"class_word": "star"}, 422, "files",
                       "101 images uploaded, more than the 100"),
    "image-too-big": ([("big.png", os.urandom(16 * 1024 * 1024 + 1))], {"class_word": "star"}, 413, None,
                      "more than the 16777216 allowed per image"),
    "body-too-big": ([("huge.png", b"\x00" * (UPLOAD_LIMIT + 1))], {"class_word": "star"}, 413, None,
                     f"exceeds {UPLOAD_LIMIT} bytes"),
    "not-an-image": ([("photo.png", b"#!/bin/sh\necho hello\n")], {"class_word": "star"}, 422, "files",
                     "'photo.png' is not an image"),
    "wrong-format": ([("anim.png", png(fmt="GIF", mode="P"))], {"class_word": "star"}, 422, "files",
                     "is GIF, not one of the accepted formats"),
    "pixel-bomb": ([("bomb.png", png_header(6000, 5000))], {"class_word": "star"}, 422, "files",
                   "6000x5000 = 30000000 pixels, more than the 25000000 allowed"),
    "pillow-bomb": ([("bomb.png", png_header(20000, 20000))], {"class_word": "star"}, 422, "files",
                    "decompression bomb"),
    "truncated": ([("cut.png", png(64)[:-30])], {"class_word": "star"}, 422, "files", "cannot be decoded"),
    "zip-dotdot": ([("d.zip", zipped({"../../evil.png": png()}))], {}, 422, "files", "contains '..'"),
    "zip-absolute": ([("d.zip", zip_with_absolute_entry())], {}, 422, "files", "is an absolute path"),
    "zip-symlink": ([("d.zip", zipped({"a.png": png()}, **{"link.png": (b"/etc/passwd", 0o120777)}))], {}, 422,
                    "files", "'link.png' is a symbolic link"),
    "zip-ratio": ([("d.zip", zipped({"zeros.png": b"\x00" * (8 * 1024 * 1024)}))], {}, 422, "files",
                  "compresses"),
    "zip-entries": ([("d.zip", zipped({f"{i}.png": b"" for i in range(201)}))], {}, 422, "files",
                    "201 entries, more than the 200"),
    "zip-manifest-image": ([("d.zip", zipped({"a.png": png(), "manifest.csv":
                                              b"image_path,prompt,base_prompt,target_prompt,instance_word\n"
                                              b"../b.png,a [v] star,a star,[v] star,star\n"}))], {}, 422, "files",
                           "is not an image in the zip"),
    "captions-not-json": ([("a.png", png())], {"class_word": "star", "captions": "{not json"}, 422, "captions",
                          "captions is not JSON"),
    "captions-not-map": ([("a.png", png())], {"class_word": "star", "captions": '["a [v] star"]'}, 422, "captions",
                         "must be a JSON object"),
    "captions-unknown-file": ([("a.png", png())], {"class_word": "star", "captions": '{"b.png": "a [v] star"}'},
                              422, "captions", "'b.png', which is not an uploaded image"),
    "caption-without-placeholder": ([("a.png", png())], {"class_word": "star", "captions": '{"a.png": "a star"}'},
                                    422, "captions", "must contain [v]"),
    "no-class-word": ([("a.png", png())], {}, 422, "class_word", "class_word is required"),
    "bad-trigger": ([("a.png", png())], {"class_word": "star", "trigger": "../x"}, 422, "trigger",
                    "is not a trigger word"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_upload_bound_is_a_clear_4xx(upload_service, case):
    files, form, status, field, phrase = CASES[case]
    resp = upload_service.upload(files, **form)
    assert resp.status_code == status, resp.text
    body = resp.json()
    if field is None:
        message = body["detail"]
    else:
        [problem] = body["detail"]
        assert problem["loc"] == ["body", field], problem
        message = problem["msg"]
    assert phrase in message, message
    assert str(upload_service.storage) not in resp.text and "/tmp" not in resp.text
    area = upload_service.storage / "data" / "alice" / "datasets"
    assert not area.exists() or not any(p.name.startswith(".tmp-") for p in area.iterdir())


def test_a_zip_with_its_manifest_is_stored_as_given(upload_service):
    client = upload_service.client()
    ds = client.upload_dataset(upload_service.samples["striped-circle"])     # the folder has a manifest.csv
    assert ds["captions"] == "manifest" and ds["images"] == 5, ds
    stored = upload_service.storage / "data" / "alice" / ds["data"]
    rows = stored.read_text().splitlines()
    given = (upload_service.samples["striped-circle"] / "manifest.csv").read_text().splitlines()
    assert rows[0] == given[0] and len(rows) == len(given)
    assert [r.split(",", 1)[1] for r in rows[1:]] == [r.split(",", 1)[1] for r in given[1:]]   # same captions
    assert all(r.startswith("imgs/") for r in rows[1:])
    assert client.delete_dataset(ds["id"]) == {"id": ds["id"], "deleted": True}


def test_another_owners_dataset_is_unreachable(upload_service):
    alice, bob = upload_service.client("alice"), upload_service.client("bob")
    ds = alice.upload_dataset([upload_service.samples["striped-circle"] / "imgs" / "00.png"], class_word="circle")
    path = f"/v1/datasets/{ds['id']}"
    for method in ("GET", "DELETE"):
        resp = upload_service.call(method, path, owner="bob")
        assert resp.status_code == 404 and ds["id"] in resp.json()["detail"], resp.text
    assert bob.datasets() == [] and [d["id"] for d in alice.datasets()] == [ds["id"]]
    with pytest.raises(ServiceError) as err:
        bob.submit_batch({"name": "stolen", "concepts": [{"id": "stolen", "trigger": "zqx", "data": ds["data"]}]})
    assert err.value.status == 422 and "concepts.0.data" in err.value.detail, err.value.detail
    assert upload_service.call("GET", path).status_code == 200          # still alice's, untouched
    assert alice.delete_dataset(ds["id"])["deleted"]
    assert upload_service.call("GET", path).status_code == 404
    assert upload_service.call("GET", "/v1/datasets/not-an-id").status_code == 422


def wait_done(client: ServiceClient, name: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.batch_status(name)
        if status["done"]:
            return status
        time.sleep(0.5)
    raise AssertionError(f"batch {name} not done after {timeout} s: {status}")


def test_uploaded_images_train_into_a_concept_composed_with_another(upload_service, tmp_path):
    client = upload_service.client()
    folder = tmp_path / "my-star"
    shutil.copytree(upload_service.samples["checkered-star"] / "imgs", folder)     # 5 images, no manifest
    ds = client.upload_dataset(folder, trigger="zqx", class_word="star")
    assert (ds["images"], ds["captions"], ds["data"]) == (5, "template", f"datasets/{ds['id']}/manifest.csv"), ds
    assert client.dataset(ds["id"]) == ds
    manifest = (upload_service.storage / "data" / "alice" / ds["data"]).read_text().splitlines()
    assert manifest[1].endswith(",a photo of [v] star,a photo of a star,[v] star,star"), manifest

    spec = {"name": "uploaded", "defaults": DEFAULTS, "validation": {"steps": 2},
            "resources": {"cpus_per_worker": 0.5, "concepts_per_pack": 2, "max_concurrent": 1, "max_attempts": 1},
            "concepts": [{"id": "my-star", "trigger": "zqx", "data": ds["data"]},
                         {"id": "striped-circle", "trigger": "vlk", "data": "striped-circle/manifest.csv"}]}
    client.submit_batch(spec)
    status = wait_done(client, "uploaded", TRAIN_TIMEOUT_S)
    assert status["counts"] == {"published": 2}, status
    result = client.generate("a <my-star> star beside a <striped-circle> circle", seed=1, steps=2, width=64,
                             height=64, concepts=[("my-star", 1.0), ("striped-circle", 1.0)])
    assert result.metadata["prompt"] == "a zqx star beside a vlk circle" and len(result.images) == 1
    assert Image.open(io.BytesIO(result.images[0][1])).size == (64, 64)


def test_a_chunked_upload_is_counted_on_received_bytes(upload_service):
    chunks = [b"x" * (1024 * 1024)] * (UPLOAD_LIMIT // (1024 * 1024) + 1)     # no Content-Length: chunked
    resp = requests.post(upload_service.url + "/v1/datasets", data=iter(chunks), timeout=60,
                         headers={"content-type": "multipart/form-data; boundary=b",
                                  **bearer(upload_service.tokens["alice"])})
    assert resp.status_code == 413 and resp.json()["detail"] == f"the body exceeds {UPLOAD_LIMIT} bytes", resp.text


def test_purecc_datasets_upload_list_delete(upload_service, tmp_path, capsys):
    from purecc.cli import main as purecc_main

    folder = tmp_path / "imgs"
    shutil.copytree(upload_service.samples["checkered-star"] / "imgs", folder)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"00.png": "a zqx star, hand drawn"}))
    common = ["--url", upload_service.url, "--token", upload_service.tokens["bob"]]
    assert purecc_main(["datasets", "upload", *common, "--trigger", "zqx", "--class-word", "star",
                        "--captions", str(captions), str(folder)]) == 0
    ds = json.loads(capsys.readouterr().out)
    assert (ds["images"], ds["captions"]) == (5, "given"), ds
    stored = (upload_service.storage / "data" / "bob" / ds["data"]).read_text()
    assert 'imgs/000-00.png,"a [v] star, hand drawn"' in stored, stored
    assert purecc_main(["datasets", "list", *common]) == 0
    assert [d["id"] for d in json.loads(capsys.readouterr().out)] == [ds["id"]]
    assert purecc_main(["datasets", "delete", *common, ds["id"]]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": ds["id"], "deleted": True}
    assert purecc_main(["datasets", "delete", *common, ds["id"]]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert purecc_main(["datasets", "upload", *common, str(tmp_path / "nowhere")]) == 1
