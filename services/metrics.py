"""Generator replica metrics, exported through Ray's metrics agent (Prometheus) on each node.

Defined with ``ray.serve.metrics``, which are ``ray.util.metrics`` plus the replica's ``deployment``,
``replica`` and ``application`` tags when recorded inside a Serve replica (none outside), so every
series is per replica without a tag of ours. The agent on each node serves them at
``http://<node-ip>:<metrics-export-port>/metrics`` with Ray's ``ray_`` prefix (``ray_purecc_...``).

Tag cardinality is bounded on purpose: no concept id is ever a tag. A service with 10,000 concepts
would otherwise create 10,000 series per metric per replica (times the buckets of a histogram),
which is what makes a Prometheus fall over. Per-concept detail stays in the replica itself
(``ConceptGenerator.stats``: slots, recent load/evict events). The tags used and their values:

- ``source`` (adapter loads): ``host_cache`` (the vector was in host memory) or ``storage``
  (read and verified from the registry);
- ``result`` (cache and slot look-ups): ``hit`` or ``miss``;
- ``status`` (requests, images): ``ok``, ``error`` or ``cancelled``.

Metrics are created on first use in the process that records them (a Serve replica's tags are read
then) and only when Ray is initialised: code run without Ray (unit tests, benchmarks) records nothing.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")

# seconds: a host-cache copy is milliseconds, a registry read of a 9 MiB adapter up to seconds on S3
LOAD_BOUNDARIES = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
# seconds: a tiny CPU pass is milliseconds, a 28-step SD3.5-M batch of 8 on one GPU tens of seconds
DENOISE_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]

STATUSES = ("ok", "error", "cancelled")


class ServiceMetrics:
    """The replica's metric objects (one set per process)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.adapter_load_s = Histogram(
            "purecc_adapter_load_seconds", "Time to put one adapter into a device slot, by where it came from.",
            boundaries=LOAD_BOUNDARIES, tag_keys=("source",))
        self.host_cache = Counter(
            "purecc_host_cache_lookups", "Host-cache look-ups of an adapter vector (result: hit or miss).",
            tag_keys=("result",))
        self.slots = Counter(
            "purecc_slot_lookups", "Concepts a request asked for: already in (or loading into) a slot, or not.",
            tag_keys=("result",))
        self.queue = Gauge(
            "purecc_generator_ongoing_requests", "Requests inside the replica now: waiting for slots or loads, "
            "queued for a pass, or rendering.")
        self.denoise_s = Histogram(
            "purecc_denoise_seconds", "Wall time of one denoising pass (one settings group of a batch).",
            boundaries=DENOISE_BOUNDARIES)
        self.batch_images = Histogram(
            "purecc_pass_images", "Images in one denoising pass.", boundaries=BATCH_BOUNDARIES)
        self.requests = Counter("purecc_generator_requests", "Render requests answered, by status.",
                                tag_keys=("status",))
        self.images = Counter("purecc_generator_images", "Images of the answered render requests, by status.",
                              tag_keys=("status",))
        self.ongoing = 0


@functools.cache
def _metrics() -> ServiceMetrics:
    return ServiceMetrics()


def get() -> ServiceMetrics | None:
    """This process's metrics, or None when Ray is not initialised (nothing would export them)."""
    import ray

    return _metrics() if ray.is_initialized() else None


def adapter_loaded(source: str, seconds: float) -> None:
    """One adapter copied into a slot, from ``host_cache`` or ``storage``, in ``seconds``."""
    m = get()
    if m is not None:
        m.adapter_load_s.observe(seconds, tags={"source": source})


def host_cache_lookup(hit: bool) -> None:
    m = get()
    if m is not None:
        m.host_cache.inc(tags={"result": "hit" if hit else "miss"})


def slot_lookups(hits: int, misses: int) -> None:
    """One request's concepts: ``hits`` already resident or loading, ``misses`` given a slot to load."""
    m = get()
    if m is not None:
        if hits:
            m.slots.inc(hits, tags={"result": "hit"})
        if misses:
            m.slots.inc(misses, tags={"result": "miss"})


def denoise_pass(seconds: float, images: int) -> None:
    m = get()
    if m is not None:
        m.denoise_s.observe(seconds)
        m.batch_images.observe(images)


def tracked_request(images: Callable[..., int]):
    """Decorate an async request handler: the ongoing gauge while it runs, requests/images by status after.

    ``images(*args, **kwargs)`` gives the request's image count from the handler's arguments.
    """
    def wrap(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(handler)
        async def run(*args, **kwargs) -> T:
            m = get()
            if m is None:
                return await handler(*args, **kwargs)
            m.ongoing += 1
            m.queue.set(m.ongoing)
            status = "error"
            try:
                result = await handler(*args, **kwargs)
                status = "ok"
                return result
            except asyncio.CancelledError:
                status = "cancelled"
                raise
            finally:
                m.ongoing -= 1
                m.queue.set(m.ongoing)
                m.requests.inc(tags={"status": status})
                n = images(*args, **kwargs)
                if n > 0:
                    m.images.inc(n, tags={"status": status})
        return run
    return wrap

