"""The progress board: a small Ray actor between training workers and the driver.

Workers push metrics, checkpoints and per-concept outcomes to it; the driver drains it and writes the
ledger (so only the head node ever opens the SQLite file). The driver posts cancellations to it and
workers poll them every step. It also remembers each concept's newest persisted checkpoint, so a
worker restarted by Ray Train can find it even before the driver has drained the message.
"""

from __future__ import annotations

import time
from typing import Any


def start_board():
    """The board as a zero-CPU actor of the calling driver (it dies with the driver)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()


class ProgressBoard:
    def __init__(self) -> None:
        self._messages: list[dict[str, Any]] = []
        self._cancel: set[str] = set()
        self._latest_ckpt: dict[str, dict[str, Any]] = {}

    def push(self, kind: str, payload: dict[str, Any]) -> None:
        """``kind``: progress | checkpoint | outcome | event."""
        msg = {"kind": kind, "at": time.time(), **payload}
        if kind == "checkpoint":  # members: [{concept_id, job_key, step}], all in the folder ``uri``
            for m in payload["members"]:
                key = f"{m['job_key']}/s{payload['stage']}"
                prev = self._latest_ckpt.get(key)
                if prev is None or prev["step"] <= m["step"]:
                    self._latest_ckpt[key] = {"step": m["step"], "uri": f"{payload['uri']}/{m['concept_id']}"}
        self._messages.append(msg)

    def drain(self) -> list[dict[str, Any]]:
        out, self._messages = self._messages, []
        return out

    def cancel(self, concept_ids: list[str]) -> None:
        self._cancel.update(concept_ids)

    def uncancel(self, concept_ids: list[str]) -> None:
        self._cancel.difference_update(concept_ids)

    def cancelled(self, concept_ids: list[str]) -> list[str]:
        return [c for c in concept_ids if c in self._cancel]

    def latest_checkpoints(self, job_keys: list[str], stage: int) -> dict[str, dict[str, Any]]:
        """Newest checkpoint of each job's ``stage`` seen by this board: job_key -> {step, uri}."""
        keys = {k: f"{k}/s{stage}" for k in job_keys}
        return {k: self._latest_ckpt[s] for k, s in keys.items() if s in self._latest_ckpt}
