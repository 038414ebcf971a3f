"""Scheduling policy for a shared cluster: how big a pack is, and which pack gets the next free run slot.

Pure functions over ledger rows (``JobRecord``) and the runs in flight, so the policy is tested without
Ray; ``cluster.scheduler`` calls them from ``plan_packs`` and ``_schedule``.

Pack size comes from a memory model fitted to measured peaks: ``peak(stage, n) = fixed(stage) +
n * per_concept(stage)`` GiB, least squares over the figures of ``bench/RESULTS.md`` ("Training throughput
on GPU": SD3.5-Medium-sized transformer, 512 px, batch 1 per concept, bank of 16 slots, H200). A pack is
the largest ``n`` whose peak, over every stage its jobs still have to run, fits the GPU memory the batch
asks for (``resources.gpu_memory_gib`` times the worker's share of a GPU) less a margin, capped at the
largest measured pack. Every stage left counts because a pack may train both stages in one process. A
user's ``concepts_per_pack`` wins. On a CPU (``gpus_per_worker: 0``, the tiny and world bases, whose
memory is negligible) and on a GPU of unknown memory the pack is ``DEFAULT_PACK``.

Fair share: when run slots are scarce, the next pack goes to the owner with the least running share,
then within that owner to the batch with the least running share, both weighted by ``resources.priority``
(a weight, 1-100: a batch of priority 4 gets four times the slots of a batch of priority 1 while both
have work; an owner's weight is its highest-priority batch with work). Ties go to the higher weight,
then to the batch submitted first; within a batch packs go first in, first out (stage-2 work first,
being closer to done). A pack's share is split over its members' batches (packs may hold concepts of
several batches with the same recipe shape). Weights, not strict priorities: a batch with no run in
flight has share 0 and so takes the next free slot unless another batch also at 0 outweighs it, so no
batch starves while runs keep ending. Each batch's ``max_concurrent`` limits only its own runs.

Known limit: a batch whose worker does not fit the free resources now is skipped for this tick while
smaller workers take the slots (no reservation), so a large worker can wait behind a stream of small ones.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .ledger import JobRecord
from .spec import Resources

# Peak GPU memory (GiB) per pack size, SD3.5 Medium, 512 px, H200: bench/RESULTS.md, "Training throughput
# on GPU (bench/gpu/train_sd35.py)", column "peak GiB" (files in bench/gpu/results/).
SD35_MEDIUM_PEAK_GIB: Mapping[int, tuple[tuple[int, float], ...]] = {
    1: ((1, 7.3), (4, 13.9), (8, 22.6)),
    2: ((1, 9.7), (4, 22.9), (8, 40.6)),
}
MEMORY_MARGIN = 0.10      # share of the GPU memory left free (allocator fragmentation, validation renders)
MAX_MODEL_PACK = 8        # the largest pack measured; beyond it the model would extrapolate (override to go higher)
DEFAULT_PACK = 4          # CPU bases (memory negligible) and GPUs of unknown memory: the previous default


@dataclass(frozen=True)
class MemoryModel:
    """Peak GiB of a pack of ``n`` concepts in one stage: ``fixed + n * per_concept``."""

    fixed: float
    per_concept: float

    def peak(self, n: int) -> float:
        return self.fixed + n * self.per_concept

    @classmethod
    def fit(cls, points: Sequence[tuple[int, float]]) -> "MemoryModel":
        """Least-squares line through measured (pack size, peak GiB) points."""
        xs, ys = [float(x) for x, _ in points], [y for _, y in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        return cls(fixed=my - slope * mx, per_concept=slope)


SD35_MEDIUM = {stage: MemoryModel.fit(points) for stage, points in SD35_MEDIUM_PEAK_GIB.items()}


def gpu_memory_per_worker(resources: Resources) -> float | None:
    """GiB a worker may use: its share of one GPU's memory (a worker uses one device); None: unknown."""
    if resources.gpus_per_worker <= 0 or resources.gpu_memory_gib is None:
        return None
    return min(resources.gpus_per_worker, 1.0) * resources.gpu_memory_gib


def pack_size(resources: Resources, stages: Iterable[int], models: Mapping[int, MemoryModel] = SD35_MEDIUM) -> int:
    """Concepts per pack for jobs with ``resources`` that still have ``stages`` to run.

    ``concepts_per_pack`` when set; else the largest n (1 at least, ``MAX_MODEL_PACK`` at most) whose
    peak in every stage fits the worker's GPU memory less ``MEMORY_MARGIN``; else ``DEFAULT_PACK``."""
    if resources.concepts_per_pack is not None:
        return resources.concepts_per_pack
    memory = gpu_memory_per_worker(resources)
    if memory is None:
        return DEFAULT_PACK
    usable = memory * (1.0 - MEMORY_MARGIN)
    worst = [models[s] for s in stages]
    n = 1
    while n < MAX_MODEL_PACK and all(m.peak(n + 1) <= usable for m in worst):
        n += 1
    return n


def stages_left(rec: JobRecord) -> tuple[int, ...]:
    """The stages a job still has to train, from its next one."""
    return tuple(range(rec.next_stage, 3))


# ----- fair share ------------------------------------------------------------------------------

def owner_of(rec: JobRecord) -> str:
    return rec.owner or ""


@dataclass
class Shares:
    """Running share per batch and per owner (a run split evenly over its members), and weights."""

    batch: dict[str, float]
    owner: dict[str, float]
    runs: dict[str, int]          # batch -> runs in flight with at least one member of it

    @classmethod
    def of(cls, running: Iterable[Sequence[JobRecord]]) -> "Shares":
        s = cls(defaultdict(float), defaultdict(float), defaultdict(int))
        for members in running:
            s.add(members)
        return s

    def add(self, members: Sequence[JobRecord]) -> None:
        for rec in members:
            self.batch[rec.batch] += 1.0 / len(members)
            self.owner[owner_of(rec)] += 1.0 / len(members)
        for b in {r.batch for r in members}:
            self.runs[b] += 1


def batch_limits(jobs: Iterable[JobRecord]) -> dict[str, int]:
    """Each batch's own limit on runs at once: the smallest ``max_concurrent`` of its jobs."""
    out: dict[str, int] = {}
    for j in jobs:
        out[j.batch] = min(out.get(j.batch, j.spec.resources.max_concurrent), j.spec.resources.max_concurrent)
    return out


def pick_batch(heads: Mapping[str, JobRecord], shares: Shares, first: Mapping[str, float]) -> str | None:
    """The batch whose head job gets the next slot: least weighted share of its owner, then of itself;
    ties to the higher weight, then to the earliest submission. ``heads``: batch -> its next job;
    ``first``: batch -> when its earliest job was submitted."""
    if not heads:
        return None
    weight = {b: rec.spec.resources.priority for b, rec in heads.items()}
    owner = {b: owner_of(rec) for b, rec in heads.items()}
    o_weight: dict[str, int] = {}
    o_first: dict[str, float] = {}
    for b in heads:
        o_weight[owner[b]] = max(o_weight.get(owner[b], 0), weight[b])
        o_first[owner[b]] = min(o_first.get(owner[b], first[b]), first[b])

    def key(b: str) -> tuple:
        o = owner[b]
        return (shares.owner[o] / o_weight[o], -o_weight[o], o_first[o], o,
                shares.batch[b] / weight[b], -weight[b], first[b], b)
    return min(heads, key=key)


class Capacity:
    """Free CPUs and GPUs per node, taken first-fit by the workers planned this tick (Ray does the real
    placement; this only keeps runs from being launched to wait on resources that are all in use)."""

    def __init__(self, nodes: Sequence[Mapping[str, float]], used: Iterable[Resources] = ()):
        self.free = [{"CPU": float(n.get("CPU", 0.0)), "GPU": float(n.get("GPU", 0.0))} for n in nodes]
        for res in used:
            self.take(res)

    def take(self, res: Resources) -> bool:
        """Reserve one worker of ``res`` on the first node with room; False when none has."""
        eps = 1e-9
        for n in self.free:
            if n["CPU"] + eps >= res.cpus_per_worker and n["GPU"] + eps >= res.gpus_per_worker:
                n["CPU"] -= res.cpus_per_worker
                n["GPU"] -= res.gpus_per_worker
                return True
        return False
