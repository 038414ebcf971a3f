"""Finite or nothing: a correctly hashed adapter holding one NaN, sitting in the registry, changes
no other request's image by a single bit.

Before the fix, a resident NaN adapter blackened every image of its replica ((x @ A) * w with
w = 0 is still NaN). Now loading it fails with a named error (``NonFiniteAdapter`` inside
``ConceptUnloadable``), the concept is marked unloadable, its slot is never written, and every
other request renders exactly what a generator over a registry without it renders.

The replica's own parts run in this process: ``HostAdapterCache`` and ``AdapterSlots`` over a
tiny pipeline's bank, and ``purecc.generate.generate`` for the passes, addressed by slot exactly
as ``ConceptGenerator._run_pass`` does (its ``@serve.batch`` needs a Serve replica).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from purecc.adapter_files import DIFFUSERS_WEIGHTS, MANIFEST, NonFiniteAdapter, load_flat
from purecc.fileio import sha256_bytes
from purecc.bank import attach_bank
from purecc.generate import RenderSettings, Sample, generate, png_bytes
from purecc.model import base_fingerprint, load_pipeline
from purecc.registry import AdapterRegistry
from services.adapter_cache import AdapterSlots, HostAdapterCache
from services.errors import ConceptUnloadable

SETTINGS = RenderSettings(steps=3, guidance=5.0, width=64, height=64)


def poison(registry: AdapterRegistry, concept_id: str) -> None:
    """One NaN in the published weights, the manifest's sha256 rewritten to match (a correct hash)."""
    folder = Path(registry.path_of(concept_id))
    tensors = load((folder / DIFFUSERS_WEIGHTS).read_bytes())
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    data = save(tensors)
    (folder / DIFFUSERS_WEIGHTS).write_bytes(data)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][DIFFUSERS_WEIGHTS] = sha256_bytes(data)
    (folder / MANIFEST).write_text(json.dumps(manifest))


class Replica:
    """One generator replica's state: a pipeline, its bank, the host cache and the device slots."""

    def __init__(self, model: Path, registry: AdapterRegistry):
        self.pipe = load_pipeline(str(model))
        tr = self.pipe.transformer
        self.bank = attach_bank(tr, 3, dtype=tr.dtype)
        self.slots = AdapterSlots(self.bank, HostAdapterCache(registry, self.bank,
                                                              base_fingerprint=base_fingerprint(tr)))
        self.keys = {str(s): s for s in range(self.bank.num_slots)}
        self.passes = asyncio.Lock()         # one pass at a time, as @serve.batch runs them


    async def render(self, concepts: tuple[str, ...], seed: int) -> list[bytes]:
        lease = await self.slots.acquire([(c, None) for c in concepts], timeout=30)
        try:
            self.slots.pin(lease.entries)          # the pass holds its slots, as the deployment's does
            routed = tuple((str(lease.slot_of[c]), 1.0) for c in concepts)
            samples = [Sample("a photo of a thing", s, routed) for s in (seed, seed + 1)]
            async with self.passes:
                images = await asyncio.to_thread(generate, self.pipe, samples, self.keys, SETTINGS)
            self.slots.unpin(lease.entries)
        finally:
            lease.release()
        return [png_bytes(im) for im in images]


def task(concepts: list[str], seed: int) -> tuple[tuple[str, ...], int]:
    return tuple(concepts), seed


GOOD_TASKS = [(["r0"], 0), (["r1"], 5), (["r0", "r1"], 9), ([], 3)]


async def render_all(gen: Replica, with_poison: bool) -> tuple[list[list[bytes]], list[BaseException]]:
    """The good tasks one after another; with ``with_poison`` the NaN concept is asked for before,
    alongside (concurrently, and in the same request as a good concept) and after them."""
    images, refusals = [], []

    async def refused(t: tuple[tuple[str, ...], int]) -> None:
        try:
            await gen.render(*t)
        except ConceptUnloadable as exc:
            refusals.append(exc)
        else:
            raise AssertionError(f"{t[0]} rendered with a NaN adapter")

    for i, (concepts, seed) in enumerate(GOOD_TASKS):
        if not with_poison:
            images.append(await gen.render(*task(concepts, seed)))
            continue
        bad = task(["nan"] if i % 2 == 0 else ["r1", "nan"], seed)
        good, _ = await asyncio.gather(gen.render(*task(concepts, seed)), refused(bad))
        images.append(good)
    return images, refusals


@pytest.fixture(scope="module")
def registries(adapter_factory, tmp_path_factory):
    clean = AdapterRegistry(tmp_path_factory.mktemp("clean"))
    dirty = AdapterRegistry(tmp_path_factory.mktemp("dirty"))
    for reg in (clean, dirty):
        for i, cid in enumerate(("r0", "r1")):
            adapter_factory.publish(reg, cid, seed=700 + i)
    adapter_factory.publish(dirty, "nan", seed=799)
    poison(dirty, "nan")
    return clean, dirty


def test_a_nan_adapter_changes_no_other_image(tiny_model_dir, registries, adapter_factory):
    clean, dirty = registries
    with pytest.raises(NonFiniteAdapter, match="1 of .* weights are not finite"):   # hashes match; NaN found
        load_flat(adapter_factory.bank, dirty.path_of("nan"), base_fingerprint=adapter_factory.fingerprint)

    reference, _ = asyncio.run(render_all(Replica(tiny_model_dir, clean), with_poison=False))
    gen = Replica(tiny_model_dir, dirty)
    images, refusals = asyncio.run(render_all(gen, with_poison=True))

    assert images == reference                                   # bit-identical PNGs, every image
    assert len(refusals) == len(GOOD_TASKS)
    assert all(r.concept_id == "nan" and "not finite" in r.reason for r in refusals)
    assert str(dirty.root) not in refusals[0].reason             # no server path in the answer
    stats = gen.slots.snapshot()
    assert stats["host"]["unloadable"] == ["nan"]
    assert stats["host"]["misses"] <= 3                          # nan read once, then refused from the mark
    assert "nan" not in gen.slots.resident()
    assert torch.isfinite(gen.bank.storage).all()                # the slot was never written
