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
    tokens = {owner: make_token(tokens_file, owner) for owner in ("alice", "bob", "carol")}
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


def patched_zip(entries: dict, *, rename: tuple[bytes, bytes] | None = None, flags: int = 0,
                declared_size: int | None = None, **kw) -> bytes:
    """A zip of one or more ``entries`` whose bytes are then edited where ``zipfile`` would not write them:
    a name replaced by a same-length one (both headers), ``flags`` or'ed into the first entry's general
    purpose bits (both headers), or the first entry's uncompressed size in the central directory set to
    ``declared_size``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", kw.pop("compression", zipfile.ZIP_DEFLATED)) as zf:
        for name, data in entries.items():
            zf.writestr(name, data, **kw)
    raw = bytearray(buf.getvalue())
    if rename is not None:
        assert len(rename[0]) == len(rename[1]) and raw.count(rename[0]) == 2
        raw = bytearray(bytes(raw).replace(*rename))
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    for at in (local + 6, central + 8):
        struct.pack_into("<H", raw, at, struct.unpack_from("<H", raw, at)[0] | flags)
    if declared_size is not None:
        struct.pack_into("<I", raw, central + 24, declared_size)
    return bytes(raw)


def zip_with_corrupt_data() -> bytes:
    """A zip whose directory is sound but whose deflate stream is garbage (zlib fails while reading)."""
    raw = zipped({"a.png": b"\x00" * 4096 + png()})
    at = raw.index(b"a.png") + len("a.png")          # the local header's name, then the compressed data
    return raw[:at] + b"\xff" * 8 + raw[at + 8:]


MIB = 1024 * 1024
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
    "zip-entry-too-big": ([("d.zip", zipped({"big.png": b"\x00" * (16 * MIB + 1)}))], {}, 413, None,
                          "zip entry 'big.png' unpacks to 16777217 bytes, more than the 16777216 allowed per file"),
    # 129 entries of 1 MiB (below the ratio floor, so they may compress well): 129 MiB unpacked, ~150 kB sent
    "zip-unpacks-too-big": ([("d.zip", zipped(dict.fromkeys((f"{i}.png" for i in range(129)), b"\x00" * MIB)))],
                            {}, 413, None, "the zip unpacks to 135266304 bytes, more than the 134217728 allowed"),
    "zip-encrypted": ([("d.zip", patched_zip({"a.png": png()}, flags=0x1))], {}, 422, "files",
                      "zip entry 'a.png' is encrypted or uses an unsupported compression"),
    "zip-bzip2": ([("d.zip", patched_zip({"a.png": png()}, compression=zipfile.ZIP_BZIP2))], {}, 422, "files",
                  "zip entry 'a.png' is encrypted or uses an unsupported compression (stored or deflated only)"),
    "zip-lying-header-small": ([("d.zip", patched_zip({"a.png": png()}, declared_size=len(png()) - 10))], {}, 422,
                               "files", "zip entry 'a.png' cannot be read (corrupt, or not the size its header "
                                        "declares): BadZipFile"),
    "zip-lying-header-large": ([("d.zip", patched_zip({"a.png": png()}, declared_size=len(png()) + 10))], {}, 422,
                               "files", "zip entry 'a.png' is not the size its header declares"),
    "zip-corrupt-directory": ([("d.zip", zipped({"a.png": png()}).replace(b"PK\x01\x02", b"PK\x09\x09"))], {},
                              422, "files", "the zip cannot be read: Bad magic number for central directory"),
    "zip-corrupt-data": ([("d.zip", zip_with_corrupt_data())], {}, 422, "files",
                         "zip entry 'a.png' cannot be read (corrupt, or not the size its header declares): error"),
    "zip-cut": ([("d.zip", zipped({"a.png": png(64)})[:-40])], {}, 422, "files",
                "the zip cannot be read: File is not a zip file"),
    "zip-backslash": ([("d.zip", zipped({"..\\evil.png": png()}))], {}, 422, "files",
                      "zip entry '..\\\\evil.png' has a backslash, NUL or drive in its name"),
    "zip-nul": ([("d.zip", patched_zip({"a.pngX.sh": png()}, rename=(b"a.pngX.sh", b"a.png\x00.sh")))], {}, 422,
                "files", "zip entry 'a.png\\x00.sh' has a backslash, NUL or drive in its name"),
    "zip-drive": ([("d.zip", zipped({"C:/x.png": png()}))], {}, 422, "files",
                  "zip entry 'C:/x.png' has a backslash, NUL or drive in its name"),
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


def test_the_per_owner_dataset_count_is_a_clear_409(upload_service):
    """carol fills her 20 datasets (``DatasetBounds.max_datasets``): the 21st is refused with 409 and leaves
    nothing behind; deleting one makes room again."""
    client, image = upload_service.client("carol"), [("a.png", png())]
    ids = []
    for _ in range(20):
        resp = upload_service.upload(image, owner="carol", class_word="star")
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
    try:
        resp = upload_service.upload(image, owner="carol", class_word="star")
        assert resp.status_code == 409, resp.text
        assert resp.json()["detail"] == ("this owner holds 20 datasets, the most allowed; delete one first"), resp.text
        assert str(upload_service.storage) not in resp.text and "/tmp" not in resp.text
        area = upload_service.storage / "data" / "carol" / "datasets"
        assert sorted(p.name for p in area.iterdir()) == sorted(ids)        # no 21st, no leftover temp folder
        assert sorted(d["id"] for d in client.datasets()) == sorted(ids)
        assert upload_service.upload(image, owner="bob", class_word="star").status_code == 201   # per owner
        assert client.delete_dataset(ids.pop())["deleted"]
        resp = upload_service.upload(image, owner="carol", class_word="star")
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
    finally:
        for dataset_id in ids:
            client.delete_dataset(dataset_id)
        for ds in upload_service.client("bob").datasets():
            upload_service.client("bob").delete_dataset(ds["id"])


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
