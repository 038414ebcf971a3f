"""Adapter residency on one replica: registry -> host cache -> device slots.

    registry (folder or pyarrow.fs URI, written by cluster/)
      -> HostAdapterCache: verified flat adapter vectors in the bank's dtype, LRU-bounded,
         in pinned memory when the bank is on CUDA
      -> AdapterSlots: which concept sits in which row of the bank's storage, who holds it,
         LRU eviction

Hot-loading a concept is one flat copy of its vector into a free row (``AdapterBank.load_slot``),
and one more of its embeddings (layer-wise or CLIP tokens) when it has them: the base weights are never re-read and
no module is re-wrapped.

Concurrency: ``AdapterSlots`` lives on the replica's event loop. Its bookkeeping runs between
awaits, so it needs no lock; file reads and device copies run in worker threads. Invariants:

- a slot whose entry has ``refs > 0`` is never evicted or overwritten; refs count the requests
  holding it plus the denoising passes using it;
- a request takes all of its slots at once or none, so requests that each need several concepts
  never hold some slots while waiting for others (no deadlock);
- a concept being loaded has exactly one entry; every request wanting it pins that entry and
  awaits the same load (single flight).

Overwriting an unpinned slot while a pass runs is exact: no sample of that pass routes to it, so
its routing weight is 0 and the slot's (finite) values contribute exact zeros.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from purecc.adapter_files import AdapterFileError, AdapterManifest, load_concept
from purecc.bank import AdapterBank
from purecc.registry import AdapterRegistry

from . import metrics
from .errors import ConceptUnloadable, ConceptUnreadable, SlotsBusy, TooManyConcepts, UnknownConcept


def adapter_version(manifest: AdapterManifest) -> str:
    """The version a request pins and the host cache keys on: ``AdapterManifest.served_version``."""
    return manifest.served_version


@dataclass(frozen=True)
class HostAdapter:
    """One verified adapter in host memory: its manifest, flat vector and embeddings."""

    manifest: AdapterManifest
    flat: torch.Tensor          # (P,) in the bank's dtype; pinned when the bank is on CUDA
    emb: torch.Tensor | None = None   # layer-wise (blocks, dim) or CLIP tokens (dim_l + dim_g,), when it has them


class HostAdapterCache:
    """Registry -> host memory, bounded to ``capacity`` concepts (LRU). Thread-safe.

    A remote registry's files are copied into a private folder under ``cache_dir`` for one read
    and removed once the vector is in memory (a miss fetches again anyway), so evicted concepts
    leave no files. ``cache_dir`` defaults to a temporary folder of the cache's own, removed by
    ``close()`` (or, failing that, when the cache is garbage-collected or the process exits).

    The version loaded is the version asked for: a request names the weights' sha256 it was
    told about, and when the registry's pointer has moved on since, that older (immutable)
    version is read, not the new one. A version that fails to load (bad files, NaN weights, another
    base) is marked unloadable for ``unloadable_s`` seconds: its requests fail at once with the
    same ``ConceptUnloadable``, and no slot is ever touched for it.
    """

    def __init__(self, registry: AdapterRegistry, bank: AdapterBank, *, base_fingerprint: str,
                 capacity: int = 64, cache_dir: str | Path | None = None, unloadable_s: float = 30.0):
        if capacity < 1:
            raise ValueError(f"host_cache: must hold at least 1 concept, got {capacity}")
        self.registry, self.bank, self.capacity = registry, bank, capacity
        self.base_fingerprint = base_fingerprint
        self.unloadable_s = unloadable_s
        self._own_dir = None if cache_dir else tempfile.TemporaryDirectory(prefix="purecc-adapters-")
        self.cache_dir = Path(cache_dir or self._own_dir.name)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._closed = False
        self.pin = bank.storage.is_cuda
        self._items: OrderedDict[tuple[str, str], HostAdapter] = OrderedDict()
        self._unloadable: dict[tuple[str, str], tuple[float, str]] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, concept_id: str, version: str | None = None) -> HostAdapter:
        """The concept's adapter (``version``: its served version; None = the registry's current one)."""
        return self.lookup(concept_id, version)[0]

    def lookup(self, concept_id: str, version: str | None = None) -> tuple[HostAdapter, bool]:
        """``get``, and whether the adapter was in host memory already (a hit)."""
        if version is not None:
            item = self._hit((concept_id, version))
            if item is not None:
                return item, True
            self._refuse_if_marked((concept_id, version))
        registry_version, manifest = self._resolve(concept_id, version)
        key = (concept_id, adapter_version(manifest))
        item = self._hit(key) if version is None else None
        if item is not None:
            return item, True
        self._refuse_if_marked(key)
        with self._lock:
            self.misses += 1
        metrics.host_cache_lookup(hit=False)
        try:
            item = self._read(concept_id, registry_version)
        except ConceptUnreadable:
            raise                       # storage trouble: the next request tries again
        except ConceptUnloadable as exc:
            with self._lock:
                self._unloadable[key] = (time.monotonic() + self.unloadable_s, exc.reason)
            raise
        with self._lock:
            self._items[(concept_id, adapter_version(item.manifest))] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item, False

    def _hit(self, key: tuple[str, str]) -> HostAdapter | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if item is not None:
            metrics.host_cache_lookup(hit=True)
        return item

    def _refuse_if_marked(self, key: tuple[str, str]) -> None:
        """Raise the recorded ``ConceptUnloadable`` while ``key`` is marked unloadable."""
        with self._lock:
            mark = self._unloadable.get(key)
            if mark is not None and mark[0] <= time.monotonic():
                del self._unloadable[key]
                mark = None
        if mark is not None:
            raise ConceptUnloadable(key[0], mark[1])

    def _resolve(self, concept_id: str, version: str | None) -> tuple[str, AdapterManifest]:
        """(registry version, manifest) to load: the current one, or the one served as ``version``."""
        try:
            current = self.registry.current(concept_id)
        except KeyError:
            raise UnknownConcept(concept_id) from None
        except AdapterFileError as exc:
            raise ConceptUnloadable(concept_id, str(exc)) from None
        except OSError as exc:
            raise ConceptUnreadable(concept_id, f"the registry cannot be read now ({type(exc).__name__})") from None
        if version is None or adapter_version(current[1]) == version:
            return current
        found = self.registry.find_version(concept_id, version)
        if found is None:
            raise UnknownConcept(concept_id, f"has no published version {version[:16]}")
        return found

    def _read(self, concept_id: str, registry_version: str | None = None) -> HostAdapter:
        """Fetch and load one registry version (None: the current one) into host memory."""
        if self._closed:
            raise RuntimeError(f"host cache: closed, cannot read {concept_id!r}")
        # a folder per read: concurrent reads of one concept (two versions) never share files
        work = Path(tempfile.mkdtemp(prefix=".read-", dir=self.cache_dir))
        try:
            try:       # a local registry's own folder: read in place
                folder = self.registry.fetch(concept_id, work, version=registry_version)
            except KeyError:
                raise UnknownConcept(concept_id) from None
            except AdapterFileError as exc:
                raise ConceptUnloadable(concept_id, str(exc)) from None
            except OSError as exc:
                raise ConceptUnreadable(concept_id, f"its files cannot be read now ({type(exc).__name__})") \
                    from None
            try:
                manifest, flat, emb = load_concept(self.bank, folder, base_fingerprint=self.base_fingerprint,
                                                   concept_id=concept_id)
            except AdapterFileError as exc:
                raise ConceptUnloadable(concept_id, str(exc)) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        flat = flat.to(self.bank.storage.dtype).contiguous()
        if emb is not None:
            emb = emb.to(self.bank.storage.dtype).contiguous()
            emb = emb.pin_memory() if self.pin else emb
        return HostAdapter(manifest, flat.pin_memory() if self.pin else flat, emb)

    def close(self) -> None:
        """Drop the host copies and remove the cache's own folder (a given ``cache_dir`` stays); idempotent."""
        with self._lock:
            self._closed = True
            self._items.clear()
        if self._own_dir is not None:
            self._own_dir.cleanup()

    def stats(self) -> dict:
        """Cache size, capacity, hits, misses and the concepts marked unloadable now."""
        now = time.monotonic()
        with self._lock:
            marked = sorted({cid for (cid, _), (until, _) in self._unloadable.items() if until > now})
            return {"cached": len(self._items), "capacity": self.capacity, "hits": self.hits,
                    "misses": self.misses, "unloadable": marked}


@dataclass(eq=False)
class SlotEntry:
    """One concept in one slot. ``ready`` resolves when its copy into the slot has finished."""

    slot: int
    concept_id: str
    version: str | None
    ready: asyncio.Future
    refs: int = 0
    last_used: int = 0
    manifest: AdapterManifest | None = None
    retired: bool = False       # a newer version was requested: freed once its refs drop to 0


@dataclass(eq=False)
class SlotLease:
    """The slots one request holds, from ``AdapterSlots.acquire`` until ``release()``."""

    owner: "AdapterSlots"
    entries: list[SlotEntry]
    hot_loaded: tuple[str, ...]           # concepts this request copied into a slot
    wait_s: float                         # waiting for slots to free up
    load_s: float                         # waiting for adapter loads (own or another request's)
    _released: bool = field(default=False, repr=False)

    @property
    def slot_of(self) -> dict[str, int]:
        """Concept id -> the slot it sits in, for this request's routing."""
        return {e.concept_id: e.slot for e in self.entries}

    def release(self) -> None:
        """Unpin the lease's slots; idempotent."""
        if not self._released:
            self._released = True
            self.owner.unpin(self.entries)


class AdapterSlots:
    """The S device slots of one bank: residency, pins, LRU eviction, single-flight loading."""

    def __init__(self, bank: AdapterBank, host: HostAdapterCache, *, history: int = 256):
        self.bank, self.host = bank, host
        self.num_slots = bank.num_slots
        self._slots: list[SlotEntry | None] = [None] * self.num_slots
        self._by_id: dict[str, SlotEntry] = {}
        self._ticks = itertools.count(1)
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._stream = torch.cuda.Stream(bank.storage.device) if bank.storage.is_cuda else None
        self.loads = 0
        self.events: deque[tuple[str, str, int]] = deque(maxlen=history)   # (load|evict, concept, slot)

    # ----- acquire / release ---------------------------------------------------------------
    async def acquire(self, wanted: Sequence[tuple[str, str | None]], *, timeout: float) -> SlotLease:
        """Hold a slot for each (concept_id, version), loading missing ones; all at once or none.

        Waits up to ``timeout`` seconds for slots to be released; raises ``SlotsBusy`` after that.
        """
        ids = [cid for cid, _ in wanted]
        if len(set(ids)) != len(ids):
            raise ValueError(f"concepts: duplicate ids in {ids}")
        if len(wanted) > self.num_slots:
            raise TooManyConcepts(len(wanted), self.num_slots)
        start = time.perf_counter()
        while True:
            changed = self._changed
            reserved = self._reserve(wanted)
            if reserved is not None:
                break
            remaining = start + timeout - time.perf_counter()
            try:
                await asyncio.wait_for(changed.wait(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                raise SlotsBusy(sum(cid not in self._by_id for cid, _ in wanted), timeout) from None
        entries, fresh = reserved
        metrics.slot_lookups(hits=len(entries) - len(fresh), misses=len(fresh))
        waited = time.perf_counter()
        for entry in fresh:
            task = asyncio.ensure_future(self._load(entry))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            # shield: a cancelled request must not cancel a load that other requests await
            await asyncio.gather(*(asyncio.shield(e.ready) for e in entries))
        except BaseException:
            self.unpin(entries)
            raise
        return SlotLease(self, entries, tuple(e.concept_id for e in fresh), waited - start,
                         time.perf_counter() - waited)

    def pin(self, entries: Sequence[SlotEntry]) -> None:
        """Take one more reference on each entry and mark it used now."""
        tick = next(self._ticks)
        for e in entries:
            e.refs += 1
            e.last_used = tick

    def unpin(self, entries: Sequence[SlotEntry]) -> None:
        """Drop one reference on each entry, mark it used now and wake waiting requests."""
        tick = next(self._ticks)
        for e in entries:
            e.refs -= 1
            e.last_used = tick
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _reserve(self, wanted) -> tuple[list[SlotEntry], list[SlotEntry]] | None:
        """Pin resident entries and claim slots for missing ones, or change nothing and return None."""
        hits, missing = [], []
        for cid, version in wanted:
            e = self._by_id.get(cid)
            if e is not None and (version is None or e.version is None or e.version == version):
                hits.append(e)
            else:
                missing.append((cid, version))
        victims = self._victims(len(missing), exclude=hits)
        if victims is None:
            return None
        loop = asyncio.get_running_loop()
        fresh = []
        for (cid, version), slot in zip(missing, victims):
            self._evict(slot)
            old = self._by_id.pop(cid, None)
            if old is not None:
                old.retired = True          # stays in its slot until the requests using it finish
            entry = SlotEntry(slot, cid, version, loop.create_future())
            entry.ready.add_done_callback(_consume_exception)
            self._slots[slot] = self._by_id[cid] = entry
            fresh.append(entry)
        self.pin(hits + fresh)
        by_id = {e.concept_id: e for e in hits + fresh}
        return [by_id[cid] for cid, _ in wanted], fresh

    def _victims(self, k: int, exclude: list[SlotEntry]) -> list[int] | None:
        """k slots to (re)use: empty ones first, then unpinned loaded ones, retired then least recently used."""
        if k == 0:
            return []
        empty = [s for s, e in enumerate(self._slots) if e is None]
        idle = sorted((e for e in self._slots if e is not None and e.refs == 0 and e.ready.done()
                       and e not in exclude), key=lambda e: (not e.retired, e.last_used))
        slots = empty + [e.slot for e in idle]
        return slots[:k] if len(slots) >= k else None

    def _evict(self, slot: int) -> None:
        e = self._slots[slot]
        if e is None:
            return
        self._slots[slot] = None
        if self._by_id.get(e.concept_id) is e:
            del self._by_id[e.concept_id]
        self.events.append(("evict", e.concept_id, slot))

    # ----- loading -------------------------------------------------------------------------
    async def _load(self, entry: SlotEntry) -> None:
        started = time.perf_counter()
        try:
            item, in_host = await asyncio.to_thread(self.host.lookup, entry.concept_id, entry.version)
            await asyncio.to_thread(self._copy, entry.slot, item)
        except BaseException as exc:
            if self._slots[entry.slot] is entry:
                self._slots[entry.slot] = None
            if self._by_id.get(entry.concept_id) is entry:
                del self._by_id[entry.concept_id]
            if isinstance(exc, asyncio.CancelledError):
                entry.ready.cancel()
            else:
                entry.ready.set_exception(exc)
            self._notify()
            return
        entry.manifest, entry.version = item.manifest, adapter_version(item.manifest)
        self.loads += 1
        self.events.append(("load", entry.concept_id, entry.slot))
        metrics.adapter_loaded("host_cache" if in_host else "storage", time.perf_counter() - started)
        entry.ready.set_result(None)

    def _copy(self, slot: int, item: HostAdapter) -> None:
        def load() -> None:
            self.bank.load_slot(slot, item.flat, emb=item.emb, trigger=item.manifest.trigger)
        if self._stream is None:
            load()
            return
        # a side stream, synchronised before the slot is marked ready: the next pass (on the
        # default stream) is launched only after the copy has landed
        with torch.cuda.stream(self._stream):
            load()
        self._stream.synchronize()

    # ----- introspection -------------------------------------------------------------------
    def resident(self) -> list[str]:
        """Concepts loaded and current (what the request router should know about)."""
        return sorted(cid for cid, e in self._by_id.items() if e.ready.done())  # failed loads leave the table

    def snapshot(self) -> dict:
        """Per-slot state, load count, recent load/evict events and host cache stats (for debugging)."""
        slots = [None if e is None else {"concept": e.concept_id, "version": e.version, "refs": e.refs,
                                         "ready": e.ready.done(), "retired": e.retired,
                                         "last_used": e.last_used}
                 for e in self._slots]
        return {"slots": slots, "loads": self.loads, "events": list(self.events), "host": self.host.stats()}


def _consume_exception(future: asyncio.Future) -> None:
    """Mark a failed load's exception as seen (its waiters may all have been cancelled)."""
    if not future.cancelled():
        future.exception()
