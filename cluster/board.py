"""The progress board: a small Ray actor between training workers and the driver.

Workers push metrics, checkpoints and per-concept outcomes to it; the driver drains it and writes the
ledger (so only the head node ever opens the SQLite file). The driver posts cancellations to it and
workers poll them every step. It also remembers each concept's newest persisted checkpoint, so a
worker restarted by Ray Train can find it even before the driver has drained the message.
"""

from __future__ import annotations

import time
from typing import Any

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressBoard:
    def __init__(self) -> None:
        self._messages: list[dict[str, Any]] = []
        self._cancel: set[str] = set()
        self._latest_ckpt: dict[str, dict[str, Any]] = {}

    def push(self, kind: str, payload: dict[str, Any]) -> None:
        """``kind``: progress | checkpoint | outcome | event."""
        msg = {"kind": kind, "at": time.time(), **payload}
        if kind == "checkpoint":
            for cid, step in payload["steps"].items():
                prev = self._latest_ckpt.get(cid)
                key = (payload["stage"], step)
                if prev is None or (prev["stage"], prev["step"]) <= key:
                    self._latest_ckpt[cid] = {"stage": payload["stage"], "step": step,
                                              "uri": f"{payload['uri']}/{cid}"}
        self._messages.append(msg)

    def drain(self) -> list[dict[str, Any]]:
        out, self._messages = self._messages, []
        return out

    def cancel(self, concept_ids: list[str]) -> None:
        self._cancel.update(concept_ids)

    def cancelled(self, concept_ids: list[str]) -> list[str]:
        return [c for c in concept_ids if c in self._cancel]

    def latest_checkpoints(self, concept_ids: list[str]) -> dict[str, dict[str, Any]]:
        return {c: self._latest_ckpt[c] for c in concept_ids if c in self._latest_ckpt}
