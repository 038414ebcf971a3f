"""AdapterSlots / HostAdapterCache without Ray: hot-loading, LRU, pins, single flight, errors."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from purecc.adapter_files import DIFFUSERS_WEIGHTS, MANIFEST
from purecc.bank import attach_bank
from purecc.model import base_fingerprint, load_pipeline
from purecc.registry import AdapterRegistry
from services.adapter_cache import AdapterSlots, HostAdapterCache, adapter_version
from services.errors import ConceptUnloadable, SlotsBusy, TooManyConcepts, UnknownConcept


@pytest.fixture(scope="module")
def registry(adapter_factory, tmp_path_factory) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path_factory.mktemp("registry"))
    for i, cid in enumerate(("a", "b", "c", "d")):
        adapter_factory.publish(reg, cid, seed=100 + i)
    return reg


def make_slots(tiny_model_dir, registry, num_slots: int, host_capacity: int = 8) -> AdapterSlots:
    tr = load_pipeline(str(tiny_model_dir)).transformer
    bank = attach_bank(tr, num_slots)
    host = HostAdapterCache(registry, bank, base_fingerprint=base_fingerprint(tr), capacity=host_capacity)
    return AdapterSlots(bank, host)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_hot_load_copies_the_adapter_into_a_slot_once(tiny_model_dir, registry, adapter_factory):
    async def main():
        slots = make_slots(tiny_model_dir, registry, 2)
        lease = await slots.acquire([("a", None)], timeout=1)
        assert lease.hot_loaded == ("a",)
        row = slots.bank.read_slot(lease.slot_of["a"])
        assert torch.equal(row, adapter_factory.flat(100))
        lease.release()
        again = await slots.acquire([("a", None)], timeout=1)
        assert again.hot_loaded == () and again.slot_of == lease.slot_of
        again.release()
        assert slots.loads == 1 and slots.resident() == ["a"]
    run(main())


def test_lru_eviction_skips_recently_used(tiny_model_dir, registry):
    async def main():
        slots = make_slots(tiny_model_dir, registry, 2)
        for cid in ("a", "b", "a"):          # a is used after b: b is the least recently used
            (await slots.acquire([(cid, None)], timeout=1)).release()
        lease = await slots.acquire([("c", None)], timeout=1)
        lease.release()
        assert slots.resident() == ["a", "c"]
        assert [e for e in slots.events if e[0] == "evict"] == [("evict", "b", 1)]
        assert lease.slot_of == {"c": 1}
    run(main())


def test_held_slot_is_never_evicted_and_a_waiter_gets_the_next_free_one(tiny_model_dir, registry, adapter_factory):
    async def main():
        slots = make_slots(tiny_model_dir, registry, 2)
        held_a = await slots.acquire([("a", None)], timeout=1)
        held_b = await slots.acquire([("b", None)], timeout=1)
        row_a = slots.bank.read_slot(held_a.slot_of["a"])
        with pytest.raises(SlotsBusy):
            await slots.acquire([("c", None)], timeout=0.2)
        waiter = asyncio.ensure_future(slots.acquire([("c", None)], timeout=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        held_b.release()
        lease_c = await waiter
        assert lease_c.slot_of["c"] == held_b.slot_of["b"]
        assert torch.equal(slots.bank.read_slot(held_a.slot_of["a"]), row_a)   # untouched while held
        assert torch.equal(slots.bank.read_slot(lease_c.slot_of["c"]), adapter_factory.flat(102))
        held_a.release()
        lease_c.release()
        assert ("evict", "a", 0) not in slots.events
    run(main())


def test_a_request_takes_all_its_slots_or_none(tiny_model_dir, registry):
    async def main():
        slots = make_slots(tiny_model_dir, registry, 2)
        held = await slots.acquire([("a", None)], timeout=1)
        with pytest.raises(SlotsBusy):
            await slots.acquire([("b", None), ("c", None)], timeout=0.1)
        assert slots.resident() == ["a"] and slots.loads == 1   # nothing half-reserved
        held.release()
        both = await slots.acquire([("b", None), ("c", None)], timeout=1)
        assert sorted(both.slot_of.values()) == [0, 1]
        with pytest.raises(TooManyConcepts):
            await slots.acquire([("a", None), ("b", None), ("c", None)], timeout=0.1)
        both.release()
    run(main())


def test_concurrent_requests_for_one_missing_concept_load_it_once(tiny_model_dir, registry):
    async def main():
        slots = make_slots(tiny_model_dir, registry, 3)
        leases = await asyncio.gather(*(slots.acquire([("d", None)], timeout=5) for _ in range(5)))
        assert {tuple(lease.slot_of.items()) for lease in leases} == {(("d", 0),)}
        assert sum(len(lease.hot_loaded) for lease in leases) == 1
        assert slots.loads == 1 and slots.host.misses == 1
        for lease in leases:
            lease.release()
        assert slots.snapshot()["slots"][0]["refs"] == 0
    run(main())


def test_unknown_and_broken_concepts_raise_and_free_their_slot(tiny_model_dir, registry, adapter_factory, tmp_path):
    broken = adapter_factory.write("broken", seed=7)
    meta = json.loads((broken / MANIFEST).read_text())
    meta["base_fingerprint"] = "another-base"
    (broken / MANIFEST).write_text(json.dumps(meta))
    registry.publish("broken", broken)

    async def main():
        slots = make_slots(tiny_model_dir, registry, 1)
        with pytest.raises(UnknownConcept):
            await slots.acquire([("nope", None)], timeout=1)
        with pytest.raises(ConceptUnloadable, match="another-base"):
            await slots.acquire([("broken", None)], timeout=1)
        assert slots.snapshot()["slots"] == [None]
        (await slots.acquire([("a", None)], timeout=1)).release()     # the slot is usable again
    run(main())


def test_republished_concept_loads_the_new_version_beside_the_held_old_one(tiny_model_dir, adapter_factory, tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    adapter_factory.publish(reg, "e", seed=200)
    v1 = adapter_version(reg.manifest("e"))

    async def main():
        slots = make_slots(tiny_model_dir, reg, 2)
        old = await slots.acquire([("e", v1)], timeout=1)
        adapter_factory.publish(reg, "e", seed=201)         # published while the service runs
        v2 = adapter_version(reg.manifest("e"))
        new = await slots.acquire([("e", v2)], timeout=1)
        assert new.slot_of != old.slot_of and new.hot_loaded == ("e",)
        assert torch.equal(slots.bank.read_slot(old.slot_of["e"]), adapter_factory.flat(200))
        assert torch.equal(slots.bank.read_slot(new.slot_of["e"]), adapter_factory.flat(201))
        old.release()
        new.release()
        latest = await slots.acquire([("e", None)], timeout=1)   # None: whatever is resident and current
        assert latest.slot_of == new.slot_of
        latest.release()
    run(main())


def test_new_embeddings_beside_the_same_lora_are_a_new_served_version(tiny_model_dir, adapter_factory, tmp_path):
    """Republishing a concept with the same LoRA and other embeddings must not serve the old embeddings
    from host memory or a slot: the served version covers the embeddings, and either version loads."""
    reg = AdapterRegistry(tmp_path / "reg")
    adapter_factory.publish(reg, "e", seed=300, trigger="zq", embeddings=True, emb_seed=1)
    m1 = reg.manifest("e")
    adapter_factory.publish(reg, "e", seed=300, trigger="zq", embeddings=True, emb_seed=2)
    m2 = reg.manifest("e")
    assert m1.files[DIFFUSERS_WEIGHTS] == m2.files[DIFFUSERS_WEIGHTS]
    v1, v2 = adapter_version(m1), adapter_version(m2)
    assert v1 != v2 and len(v1) == len(v2) == 64
    assert reg.find_version("e", v1)[1].files == m1.files and reg.find_version("e", v2)[1].files == m2.files

    async def main():
        slots = make_slots(tiny_model_dir, reg, 2)
        old = await slots.acquire([("e", v1)], timeout=1)
        new = await slots.acquire([("e", v2)], timeout=1)
        assert new.slot_of != old.slot_of and new.hot_loaded == ("e",)
        emb = slots.bank.embeddings
        assert torch.equal(emb.read_slot(old.slot_of["e"]), adapter_factory.embeddings(1))
        assert torch.equal(emb.read_slot(new.slot_of["e"]), adapter_factory.embeddings(2))
        old.release()
        new.release()
    run(main())


def test_host_cache_is_bounded_and_serves_reloads(tiny_model_dir, registry):
    async def main():
        slots = make_slots(tiny_model_dir, registry, 1, host_capacity=2)
        for cid in ("a", "b", "a", "c", "a"):
            (await slots.acquire([(cid, None)], timeout=1)).release()
        host = slots.host.stats()
        assert host["cached"] == 2
        # one slot: every switch reloads; the 2nd and 3rd loads of a come from host memory
        assert (host["hits"], host["misses"]) == (2, 3)
    run(main())
