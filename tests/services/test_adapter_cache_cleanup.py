"""HostAdapterCache leaves no files behind: fetched copies go once read, its own folder on close()."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest
import torch

from purecc.bank import attach_bank
from purecc.model import base_fingerprint, load_pipeline
from purecc.registry import AdapterRegistry
from services.adapter_cache import HostAdapterCache


@pytest.fixture(scope="module")
def local_registry(adapter_factory, tmp_path_factory) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path_factory.mktemp("registry"))
    for i, cid in enumerate(("a", "b", "c")):
        adapter_factory.publish(reg, cid, seed=300 + i)
    return reg


@pytest.fixture(scope="module")
def remote_registry(local_registry) -> AdapterRegistry:
    """The same registry behind a non-local pyarrow file system: reads copy files into the cache folder."""
    reg = AdapterRegistry(local_registry.root)
    reg.fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file")))
    assert not reg.is_local
    return reg


@pytest.fixture(scope="module")
def bank_and_fp(tiny_model_dir):
    tr = load_pipeline(str(tiny_model_dir)).transformer
    return attach_bank(tr, 2), base_fingerprint(tr)


def make_cache(registry, bank_and_fp, **kwargs) -> HostAdapterCache:
    bank, fp = bank_and_fp
    return HostAdapterCache(registry, bank, base_fingerprint=fp, **kwargs)


def files_under(folder) -> list:
    return sorted(p for p in folder.rglob("*"))


def test_fetched_files_are_removed_once_read(remote_registry, bank_and_fp, adapter_factory):
    cache = make_cache(remote_registry, bank_and_fp, capacity=1)
    for cid in ("a", "b", "a"):                      # "a" is evicted by "b", then read again
        assert torch.equal(cache.get(cid).flat, adapter_factory.flat(300 if cid == "a" else 301))
        assert files_under(cache.cache_dir) == []
    assert cache.stats()["misses"] == 3
    cache.close()


def test_close_removes_its_own_folder(remote_registry, bank_and_fp):
    cache = make_cache(remote_registry, bank_and_fp)
    cache.get("c")
    folder = cache.cache_dir
    assert folder.is_dir()
    cache.close()
    cache.close()                                    # idempotent
    assert not folder.exists() and cache.stats()["cached"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        cache.get("c")


def test_a_given_cache_dir_is_emptied_but_kept(remote_registry, bank_and_fp, tmp_path):
    given = tmp_path / "cache"
    cache = make_cache(remote_registry, bank_and_fp, cache_dir=given)
    cache.get("a")
    cache.close()
    assert given.is_dir() and files_under(given) == []


def test_a_local_registry_is_read_in_place_and_left_alone(local_registry, bank_and_fp):
    before = files_under(Path(local_registry.adapters))
    cache = make_cache(local_registry, bank_and_fp)
    cache.get("a")
    cache.close()
    assert files_under(Path(local_registry.adapters)) == before


def test_concurrent_reads_of_one_concept_do_not_collide(remote_registry, bank_and_fp, adapter_factory):
    cache = make_cache(remote_registry, bank_and_fp)
    with ThreadPoolExecutor(8) as pool:
        flats = list(pool.map(lambda _: cache._read("b").flat, range(16)))
    assert all(torch.equal(f, adapter_factory.flat(301)) for f in flats)
    assert files_under(cache.cache_dir) == []
    cache.close()
