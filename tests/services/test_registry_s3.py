"""The registry on S3-compatible object storage: moto's real server on 127.0.0.1, pyarrow's S3 client.

Publish, replace and fetch go through ``pyarrow.fs.S3FileSystem`` exactly as in production (a
``s3://bucket/prefix?endpoint_override=...`` root); the bucket is made and inspected with boto3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from purecc.adapter_files import DIFFUSERS_WEIGHTS, MANIFEST, POINTER, UnsafeFile, load_flat
from purecc.model import load_pipeline
from purecc.registry import AdapterRegistry
from services.adapter_cache import HostAdapterCache, adapter_version
from services.catalog import ConceptCatalog
from services.errors import ConceptUnservable

from registry_helpers import replace_while_reading

BUCKET = "purecc-registry"


@pytest.fixture(scope="module")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()[1]
    finally:
        server.stop()


@pytest.fixture()
def s3_root(s3_server, monkeypatch, request):
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_server}", region_name="us-east-1")
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    prefix = request.node.name.replace("[", "-").replace("]", "")
    root = f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{s3_server}&scheme=http&region=us-east-1"
    return root, client, prefix


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def bank_and_fp(tiny_model_dir):
    from purecc.bank import attach_bank
    from purecc.model import base_fingerprint

    tr = load_pipeline(str(tiny_model_dir)).transformer
    return attach_bank(tr, 2), base_fingerprint(tr)


def test_publish_list_fetch(s3_root, adapter_factory, tmp_path, bank_and_fp):
    root, client, prefix = s3_root
    reg = AdapterRegistry(root)
    assert not reg.is_local and reg.list() == [] and keys(client, prefix) == []   # reading writes nothing
    folder = adapter_factory.write("zig", seed=1)
    target = reg.publish("zig", folder, owner="ann")
    version, manifest = reg.current("zig")
    assert target.endswith(f"/adapters/zig/{version}") and manifest.concept_id == "zig"
    stored = keys(client, prefix)
    assert f"adapters/zig/{POINTER}" in stored and f"adapters/zig/{version}/{MANIFEST}" in stored
    assert [m.concept_id for m in AdapterRegistry(root).list()] == ["zig"] and reg.owner("zig") == "ann"
    fetched = reg.fetch("zig", tmp_path / "cache")
    assert fetched == tmp_path / "cache" / "zig" / version
    assert (fetched / DIFFUSERS_WEIGHTS).read_bytes() == (folder / DIFFUSERS_WEIGHTS).read_bytes()
    mtime = (fetched / MANIFEST).stat().st_mtime_ns
    assert reg.fetch("zig", tmp_path / "cache") == fetched and (fetched / MANIFEST).stat().st_mtime_ns == mtime
    bank, fp = bank_and_fp
    _, flat = load_flat(bank, fetched, base_fingerprint=fp, concept_id="zig")
    assert torch.equal(flat, adapter_factory.flat(1))
    with pytest.raises(KeyError):
        reg.fetch("nope", tmp_path / "cache")


def test_replace_keeps_old_versions_readable_and_serves_what_it_reports(s3_root, adapter_factory, tmp_path,
                                                                        bank_and_fp):
    root, client, prefix = s3_root
    reg = AdapterRegistry(root)
    reg.publish("zig", adapter_factory.write("zig", seed=1))
    v1, m1 = reg.current("zig")
    reg.publish("zig", adapter_factory.write("zig", seed=2))
    v2, m2 = reg.current("zig")
    assert v1 != v2 and reg.versions("zig") == sorted([v1, v2])
    assert reg.version_manifest("zig", v1).files == m1.files            # the old version is untouched
    old = reg.fetch("zig", tmp_path / "cache", version=v1)
    assert old.name == v1 and (old / DIFFUSERS_WEIGHTS).is_file()
    bank, fp = bank_and_fp
    host = HostAdapterCache(reg, bank, base_fingerprint=fp, cache_dir=tmp_path / "host")
    # a request told about v1 (before the flip) gets v1; one asking for the current gets v2
    assert torch.equal(host.get("zig", adapter_version(m1)).flat, adapter_factory.flat(1))
    assert torch.equal(host.get("zig").flat, adapter_factory.flat(2))
    assert host.get("zig").manifest.files == m2.files
    host.close()


def test_a_concurrent_reader_never_sees_a_missing_concept(s3_root, adapter_factory, tmp_path):
    root, _, _ = s3_root
    folders = [adapter_factory.write("live", seed=40 + i) for i in range(4)]

    def check(reader, published) -> str:
        version, manifest = reader.current("live")
        listed = [m.concept_id for m in reader.list()]
        folder = reader.fetch("live", tmp_path / "reader-cache", version=version)
        if "live" not in listed or not (folder / DIFFUSERS_WEIGHTS).is_file():
            why = [(e.concept_id, e.reason) for e in reader.scan()]
            return f"problem: listed {listed} (scan: {why}), fetched {sorted(p.name for p in folder.iterdir())}"
        return version

    problems, seen, published = replace_while_reading(root, "live", folders, check, join_s=60.0,
                                                      max_reads=10**9)
    assert problems == []
    assert seen and set(seen) <= published and len(published) == 4


def test_bad_objects_are_reported_not_served(s3_root, adapter_factory, tmp_path):
    root, client, prefix = s3_root
    reg = AdapterRegistry(root)
    reg.publish("good", adapter_factory.write("good", seed=5))
    reg.publish("bad", adapter_factory.write("bad", seed=6))
    version, _ = reg.current("bad")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/adapters/bad/{version}/{MANIFEST}", Body=b"{not json")
    entries = {e.concept_id: e for e in reg.scan()}
    assert not entries["bad"].servable and "not valid JSON" in entries["bad"].reason
    assert [m.concept_id for m in reg.list()] == ["good"]
    import asyncio

    catalog = ConceptCatalog(reg, ttl_s=0)
    with pytest.raises(ConceptUnservable, match="concept 'bad' cannot be served: purecc_adapter.json"):
        asyncio.run(catalog.lookup("bad"))
    assert [m.concept_id for m in asyncio.run(catalog.list())] == ["good"]
    # an object whose key climbs out of its version folder is refused when fetched, never written
    good_version, _ = reg.current("good")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/adapters/good/{good_version}/../../escape.json", Body=b"{}")
    assert any(k.endswith("/../../escape.json") for k in keys(client, prefix))   # S3 keeps the key as given
    with pytest.raises(UnsafeFile, match="not a plain file name"):
        reg.fetch("good", tmp_path / "cache")
    assert not list(Path(tmp_path).rglob("escape.json"))


def test_an_unreachable_store_is_a_named_refusal_never_a_mark(s3_root, tmp_path, bank_and_fp):
    import asyncio
    import socket

    from services.errors import ConceptUnreadable

    with socket.socket() as s:                  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = AdapterRegistry(f"s3://{BUCKET}/gone?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1")
    bank, fp = bank_and_fp
    host = HostAdapterCache(reg, bank, base_fingerprint=fp, cache_dir=tmp_path / "host")
    with pytest.raises(ConceptUnreadable, match="cannot be read now"):
        host.get("zig")
    assert host.stats()["unloadable"] == []          # storage trouble is retried by the next request
    with pytest.raises(ConceptUnservable, match="cannot be read now"):
        asyncio.run(ConceptCatalog(reg, ttl_s=0).lookup("zig"))
    host.close()


def test_concurrent_fetches_of_one_version_share_one_copy(s3_root, adapter_factory, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    root, _, _ = s3_root
    reg = AdapterRegistry(root)
    reg.publish("many", adapter_factory.write("many", seed=60))
    version, _ = reg.current("many")
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: AdapterRegistry(root).fetch("many", tmp_path / "cache"), range(16)))
    assert set(folders) == {tmp_path / "cache" / "many" / version}
    assert sorted(p.name for p in (tmp_path / "cache" / "many").iterdir()) == [version]   # no temp left
    assert (folders[0] / MANIFEST).is_file() and (folders[0] / DIFFUSERS_WEIGHTS).is_file()


def test_refusals_pickle_unchanged():
    """They cross Ray's process boundaries (generator -> ingress) and must read the same after."""
    import pickle

    from purecc.registry import NotOwner, UnknownVersion
    from services.errors import ConceptUnreadable

    for exc in (ConceptUnservable("zig", "concept zig: purecc_adapter.json is not valid JSON"),
                ConceptUnreadable("zig", "its files cannot be read now (OSError)"), NotOwner("zig", "ann"),
                UnknownVersion("zig", "0" * 32)):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc)
    assert str(ConceptUnservable("zig", "concept zig: x")) == "concept 'zig' cannot be served: x"
