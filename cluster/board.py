"""The progress board: a small Ray actor between training workers and the driver.

Workers push metrics, checkpoints and per-concept outcomes to it; the driver drains it and writes the
ledger (so only the head node ever opens the SQLite file). The driver posts cancellations to it and
workers poll them every step. It also remembers each concept's newest persisted checkpoint, so a
worker restarted by Ray Train can find it even before the driver has drained the message.

Undrained messages are bounded (``max_messages``): a concept's progress message replaces its last
undrained one; past the bound the oldest message of the cheapest kind to lose goes (progress, then
events, then checkpoints, outcomes last). Drops are counted (``stats()``) and reported by the next
``drain`` as one ``board-dropped`` event, so they reach the ledger's history.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import Any

KINDS = ("progress", "checkpoint", "outcome", "event")
DROP_ORDER = ("progress", "event", "checkpoint", "outcome")   # cheapest to lose first
MAX_MESSAGES = 10_000   # undrained; a driver drains every second or so, so this is only reached without one


def _carry_curve(older: dict[str, Any], newer: dict[str, Any]) -> None:
    """A progress message that replaces an older one of the same stage keeps the older one's loss
    curve when it has none of its own (curves ride on few messages; none is lost by a replacement)."""
    if "curve" in older and "curve" not in newer and older.get("stage") == newer.get("stage"):
        newer["curve"] = older["curve"]


def start_board():
    """The board as a zero-CPU actor of the calling driver (it dies with the driver), on the driver's own
    node: placed anywhere else, losing that node would kill the driver's loop (seen on a 2-node cluster)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).options(scheduling_strategy=here).remote()


class ProgressBoard:
    """Messages from workers to the driver, cancellations from the driver to workers, newest checkpoints."""

    def __init__(self, max_messages: int = MAX_MESSAGES) -> None:
        if max_messages < 1:
            raise ValueError(f"board: max_messages must be at least 1, got {max_messages}")
        self.max_messages = max_messages
        # kind -> key -> (seq, message); a progress message is keyed by its concept, any other by its seq
        self._pending: dict[str, dict[Any, tuple[int, dict[str, Any]]]] = {k: {} for k in KINDS}
        self._seq = itertools.count()
        self._dropped: Counter[str] = Counter()      # per kind, since the board started
        self._unreported: Counter[str] = Counter()   # per kind, since the last drain
        self._cancel: set[str] = set()
        self._latest_ckpt: dict[str, dict[str, Any]] = {}
        self._handover: dict[str, list[str]] = {}   # whole-life run name -> members the ledger moved to stage 2

    def push(self, kind: str, payload: dict[str, Any]) -> None:
        """``kind``: progress | checkpoint | outcome | event."""
        if kind not in self._pending:
            raise ValueError(f"board: message kind {kind!r} is not one of {', '.join(KINDS)}")
        msg = {"kind": kind, "at": time.time(), **payload}
        if kind == "checkpoint":  # members: [{concept_id, job_key, step}], all in the folder ``uri``
            for m in payload["members"]:
                key = f"{m['job_key']}/s{payload['stage']}"
                prev = self._latest_ckpt.get(key)
                if prev is None or prev["step"] <= m["step"]:
                    self._latest_ckpt[key] = {"step": m["step"], "uri": f"{payload['uri']}/{m['concept_id']}"}
        seq, queue = next(self._seq), self._pending[kind]
        key = payload.get("concept_id") if kind == "progress" else seq
        replaced = queue.pop(key, None)   # the newest progress goes to the end: dicts keep insertion order
        if replaced is not None and kind == "progress":
            _carry_curve(replaced[1], msg)
        queue[key] = (seq, msg)
        if sum(map(len, self._pending.values())) > self.max_messages:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        kind = next(k for k in DROP_ORDER if self._pending[k])
        queue = self._pending[kind]
        del queue[next(iter(queue))]
        self._dropped[kind] += 1
        self._unreported[kind] += 1

    def drain(self) -> list[dict[str, Any]]:
        """The messages pushed since the last drain, oldest first (the board keeps none).

        Each concept's progress comes once, its newest; when messages were dropped since the last
        drain, a last ``event`` message ``board-dropped`` says how many of each kind.
        """
        items = sorted((item for queue in self._pending.values() for item in queue.values()), key=lambda it: it[0])
        for queue in self._pending.values():
            queue.clear()
        out = [msg for _, msg in items]
        if self._unreported:
            out.append({"kind": "event", "at": time.time(), "concept_id": None, "event": "board-dropped",
                        "detail": dict(self._unreported)})
            self._unreported.clear()
        return out

    def stats(self) -> dict[str, Any]:
        """Undrained messages, the bound, and the messages dropped per kind since the board started."""
        return {"pending": sum(map(len, self._pending.values())), "max_messages": self.max_messages,
                "dropped": dict(self._dropped)}

    def cancel(self, concept_ids: list[str]) -> None:
        """Ask the workers training ``concept_ids`` to stop them."""
        self._cancel.update(concept_ids)

    def uncancel(self, concept_ids: list[str]) -> None:
        """Withdraw the cancellation of ``concept_ids`` (e.g. once they are requeued)."""
        self._cancel.difference_update(concept_ids)

    def cancelled(self, concept_ids: list[str]) -> list[str]:
        """Those of ``concept_ids`` whose cancellation was requested."""
        return [c for c in concept_ids if c in self._cancel]

    def latest_checkpoints(self, job_keys: list[str], stage: int) -> dict[str, dict[str, Any]]:
        """Newest checkpoint of each job's ``stage`` seen by this board: job_key -> {step, uri}."""
        keys = {k: f"{k}/s{stage}" for k in job_keys}
        return {k: self._latest_ckpt[s] for k, s in keys.items() if s in self._latest_ckpt}

    def hand_over(self, run: str, concept_ids: list[str]) -> None:
        """The driver recorded stage 1 of run ``run`` as done: its worker trains ``concept_ids``' stage 2."""
        self._handover[run] = list(concept_ids)

    def handed_over(self, run: str) -> list[str] | None:
        """The members run ``run`` may train in stage 2, or None while the driver has not said yet."""
        return self._handover.get(run)
