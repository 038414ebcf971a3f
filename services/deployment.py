"""The generation deployment: one shared base per replica, an adapter bank, batched passes.

A replica loads the base once (in ``__init__``, so Serve routes nothing to it before the model is
ready) and attaches an ``AdapterBank`` of ``slots`` rows once. A request names (concept, weight,
version) triples: ``AdapterSlots.acquire`` holds a slot for each, hot-loading missing ones from
the registry. Held requests then meet in ``@serve.batch``: every request whose render settings
(size, steps, guidance) match shares one ``purecc.generate.generate`` call, each sample with its
own routing row and seed, so a batched image equals the image the request gets alone. Requests
with other settings in the same batch get their own pass, one after the other.

The heavy work runs in worker threads (``asyncio.to_thread``), so the replica keeps answering
health checks, routing-stats polls and slot bookkeeping while it renders.

A pass stops between denoising steps (``purecc.generate.RenderCancelled``) once every request in it
is gone: cancelled by its caller (the ingress cancels a request it stopped waiting for) or past its
deadline (``request_timeout_s`` after it reached the replica). A thread cannot be cancelled, so
without this a request that had timed out would keep the replica busy to its last step.

Routing affinity: a custom Serve request router (``services.routing.ConceptAffinityRouter``), not
model multiplexing. Each replica reports its resident concepts (``record_routing_stats``) and a
request goes to the replica holding most of its concepts; multiplexing would key affinity and
eviction on one id per concept *set*, while residency here is per concept and sets overlap (the
full reasoning is in ``services.routing``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ray import serve

from purecc.bank import attach_bank, attach_clip_tokens
from purecc.generate import RenderSettings, Sample, generate, png_bytes
from purecc.model import ModelConfig, base_fingerprint, load_pipeline
from purecc.registry import AdapterRegistry

from . import metrics
from .adapter_cache import AdapterSlots, HostAdapterCache, SlotLease
from .config import ServiceConfig
from .schemas import MAX_SIDE


class ConceptUse(NamedTuple):
    """One concept of a request: which adapter, at what weight."""

    concept_id: str
    weight: float
    version: str | None = None      # AdapterManifest.served_version; None: the registry's current one


@dataclass(frozen=True)
class RenderTask:
    """One request as the generator sees it: placeholders already replaced by trigger words."""

    prompt: str
    seeds: tuple[int, ...]
    settings: RenderSettings
    concepts: tuple[ConceptUse, ...] = ()
    negative_prompt: str = ""

    @property
    def concept_ids(self) -> tuple[str, ...]:
        """The ids of the task's concepts (read by ``services.routing``)."""
        return tuple(c.concept_id for c in self.concepts)


@dataclass(frozen=True)
class RenderResult:
    """A rendered task: its PNGs, the slots its concepts held, and where the replica's time went."""

    pngs: list[bytes]
    seeds: tuple[int, ...]
    slot_of: dict[str, int]
    hot_loaded: tuple[str, ...]
    batch_images: int
    replica: str
    wait_s: float           # waiting for free slots
    load_s: float           # waiting for adapter loads
    queue_s: float          # holding slots, waiting for a pass
    denoise_s: float        # the pass
    elapsed_s: float        # everything inside the replica


@dataclass(eq=False)
class _Pending:
    task: RenderTask
    lease: SlotLease
    held_at: float
    deadline: float                 # time.monotonic() past which nobody waits for the answer
    cancelled: bool = field(default=False)

    def gone(self) -> bool:
        """Nobody waits for this request's images any more (read from the render thread)."""
        return self.cancelled or time.monotonic() > self.deadline


@dataclass(frozen=True)
class _PassOutcome:
    pngs: list[bytes]
    started: float
    denoise_s: float
    batch_images: int


def _images_in(items: list[_Pending]) -> int:
    return sum(len(p.task.seeds) for p in items)


LOOPBACK_GRPC_FLAG = "_purecc_loopback"


def keep_replica_grpc_on_loopback() -> None:
    """Make this replica's inter-deployment gRPC server listen on 127.0.0.1 when its node is 127.0.0.1.

    Ray Serve 2.60 binds that server to every interface with no setting to change it
    (``ray/serve/_private/replica.py``, ``_on_initialized``:
    ``add_port_to_grpc_server(self._server, "[::]:0")``). Callers reach a replica at its node IP, so
    on a loopback node (a local cluster, ``cluster.local_ray``) binding 127.0.0.1 serves them all.
    Call it from a deployment's constructor: Serve starts that server right after the constructor
    returns, through the module attribute replaced here. Elsewhere it changes nothing.
    """
    import ray
    from ray.serve._private import replica as serve_replica

    from cluster.local_ray import is_loopback

    add_port = serve_replica.add_port_to_grpc_server
    if getattr(add_port, LOOPBACK_GRPC_FLAG, False) or not is_loopback(ray.util.get_node_ip_address() + ":0"):
        return

    def add_loopback_port(server, address: str) -> int:
        host, _, port = address.rpartition(":")
        return add_port(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0") else address)
    setattr(add_loopback_port, LOOPBACK_GRPC_FLAG, True)
    serve_replica.add_port_to_grpc_server = add_loopback_port


def model_limits(pipe) -> tuple[int, int]:
    """(native side, largest side) in pixels for this SD3 pipeline."""
    cfg = pipe.transformer.config
    native = int(cfg.sample_size) * pipe.vae_scale_factor
    if cfg.pos_embed_max_size is None:
        return native, MAX_SIDE
    return native, min(MAX_SIDE, int(cfg.pos_embed_max_size) * int(cfg.patch_size) * pipe.vae_scale_factor)


class ConceptGenerator:
    """Serve deployment class (wrapped by ``serve.deployment`` in ``services.app``)."""

    def __init__(self, config: ServiceConfig):
        keep_replica_grpc_on_loopback()
        self.config = config
        self.pipe = load_pipeline(ModelConfig(path=config.model, dtype=config.dtype, device=config.device,
                                              load_t5=config.load_t5))
        tr = self.pipe.transformer
        self.fingerprint = base_fingerprint(tr)
        self.bank = attach_bank(tr, config.slots, rank=config.rank, dtype=tr.dtype)
        attach_clip_tokens(self.pipe, self.bank)     # for concepts whose embeddings are CLIP tokens
        host = HostAdapterCache(AdapterRegistry(config.registry), self.bank, base_fingerprint=self.fingerprint,
                                capacity=config.host_cache)
        self.slots = AdapterSlots(self.bank, host)
        self.native_side, self.max_side = model_limits(self.pipe)
        self._slot_keys = {str(s): s for s in range(self.bank.num_slots)}
        self._render_batch.set_max_batch_size(config.max_batch_images)
        self._render_batch.set_batch_wait_timeout_s(config.batch_wait_s)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:      # constructed outside Serve (benchmarks, tests)
            self.replica = "local"
        import ray

        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        if config.warmup:
            self._warmup()

    def __del__(self) -> None:
        # Serve calls it when the replica shuts down: the host cache's temporary folder goes with it
        slots = getattr(self, "slots", None)
        if slots is not None:
            slots.host.close()

    def _warmup(self) -> None:
        """One 2-step pass through the banked layers (slot 0 is all zeros, so it is the bare base)."""
        side = min(self.native_side, 256)
        sample = Sample("warm up", 0, (("0", 1.0),))
        generate(self.pipe, [sample], self._slot_keys, RenderSettings(steps=2, guidance=2.0, width=side, height=side))

    # ----- requests ------------------------------------------------------------------------
    @metrics.tracked_request(images=lambda self, task: len(task.seeds))
    async def render(self, task: RenderTask) -> RenderResult:
        """Render one request: hold a slot per concept (hot-loading them), then join a batched pass."""
        arrived = time.perf_counter()
        deadline = time.monotonic() + self.config.request_timeout_s
        lease = await self.slots.acquire([(c.concept_id, c.version) for c in task.concepts],
                                         timeout=self.config.slot_wait_s)
        pending = _Pending(task, lease, time.perf_counter(), deadline)
        try:
            outcome = await self._render_batch(pending)
        except asyncio.CancelledError:    # the caller gave up: its pass may stop (the thread goes on)
            pending.cancelled = True
            raise
        finally:
            lease.release()
        if isinstance(outcome, BaseException):
            raise outcome
        done = time.perf_counter()
        return RenderResult(
            pngs=outcome.pngs, seeds=task.seeds, slot_of=lease.slot_of, hot_loaded=lease.hot_loaded,
            batch_images=outcome.batch_images, replica=self.replica, wait_s=lease.wait_s, load_s=lease.load_s,
            queue_s=max(outcome.started - pending.held_at, 0.0), denoise_s=outcome.denoise_s, elapsed_s=done - arrived)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_images_in)
    async def _render_batch(self, items: list[_Pending]) -> list[_PassOutcome | BaseException]:
        for p in items:     # the pass holds its slots itself: a cancelled caller releases only its own hold
            self.slots.pin(p.lease.entries)
        try:
            groups: dict[RenderSettings, list[_Pending]] = {}
            for p in items:
                groups.setdefault(p.task.settings, []).append(p)
            results: dict[int, _PassOutcome | BaseException] = {}
            for settings, group in groups.items():
                started = time.perf_counter()
                try:
                    pngs = await asyncio.to_thread(self._run_pass, group, settings)
                except Exception as exc:   # answer this group's requests; other groups still run
                    results.update({id(p): exc for p in group})
                    continue
                took, n = time.perf_counter() - started, _images_in(group)
                metrics.denoise_pass(took, n)
                for p in group:
                    k = len(p.task.seeds)
                    results[id(p)] = _PassOutcome(pngs[:k], started, took, n)
                    pngs = pngs[k:]
            return [results[id(p)] for p in items]
        finally:
            for p in items:
                self.slots.unpin(p.lease.entries)

    def _run_pass(self, group: list[_Pending], settings: RenderSettings) -> list[bytes]:
        # concepts are addressed by slot number, so two publications of one concept id can share a pass
        samples = []
        for p in group:
            slot_of = p.lease.slot_of
            concepts = tuple((str(slot_of[c.concept_id]), c.weight) for c in p.task.concepts)
            samples += [Sample(p.task.prompt, seed, concepts, p.task.negative_prompt) for seed in p.task.seeds]
        images = generate(self.pipe, samples, self._slot_keys, settings,
                          should_stop=lambda: all(p.gone() for p in group))
        return [png_bytes(im) for im in images]

    # ----- introspection -------------------------------------------------------------------
    async def describe(self) -> dict:
        """What the ingress needs to validate requests; answering at all means the model is loaded."""
        return {"replica": self.replica, "slots": self.bank.num_slots, "native_side": self.native_side,
                "max_side": self.max_side, "base_fingerprint": self.fingerprint,
                "max_images": self.config.max_images_per_request}

    async def record_routing_stats(self) -> dict:
        """Polled by Serve every ``routing_stats_period_s``; read by ``services.routing``."""
        return {"concepts": self.slots.resident()}

    async def stats(self) -> dict:
        """This replica's slot and cache counters (tests, benchmarks)."""
        return {"replica": self.replica, "node_id": self.node_id, **self.slots.snapshot()}
