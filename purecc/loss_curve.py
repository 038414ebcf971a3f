"""A bounded record of a concept's training loss: the recent steps exactly, the whole run downsampled.

A long run must not make every checkpoint and every catalog read slower, so neither the checkpoint
state nor the adapter manifest holds the per-step history: they hold a ``LossCurve``, whose size is
fixed (``WINDOW`` recent values and at most ``MAX_POINTS`` bucket means) whatever the step count.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

WINDOW = 100          # recent per-step values kept exactly
MAX_POINTS = 128      # points of the downsampled curve


@dataclass
class LossCurve:
    """Per-step losses folded into buckets of ``bucket`` steps (each point: first step, last step, mean)."""

    recent: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    points: list[list[float]] = field(default_factory=list)   # [first_step, last_step, mean]
    bucket: int = 1
    steps: int = 0

    def add(self, loss: float) -> None:
        """Record the next step's loss."""
        self.steps += 1
        self.recent.append(float(loss))
        last = self.points[-1] if self.points else None
        if last is not None and last[1] - last[0] + 1 < self.bucket:
            n = last[1] - last[0] + 1
            last[1], last[2] = self.steps, (last[2] * n + loss) / (n + 1)
        else:
            self.points.append([self.steps, self.steps, float(loss)])
        if len(self.points) > MAX_POINTS:
            self._halve()

    def _halve(self) -> None:
        """Merge neighbouring points pairwise (step-weighted means); buckets double."""
        merged = []
        for i in range(0, len(self.points), 2):
            pair = self.points[i:i + 2]
            n = [p[1] - p[0] + 1 for p in pair]
            mean = sum(p[2] * k for p, k in zip(pair, n)) / sum(n)
            merged.append([pair[0][0], pair[-1][1], mean])
        self.points, self.bucket = merged, self.bucket * 2

    def last_mean(self, k: int = 10) -> float | None:
        """Mean of the last ``k`` recorded losses (None before the first step)."""
        tail = list(self.recent)[-k:]
        return sum(tail) / len(tail) if tail else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for checkpoints and manifests)."""
        return {"recent": list(self.recent), "points": self.points, "bucket": self.bucket, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LossCurve":
        """Inverse of ``to_dict``."""
        return cls(recent=deque(data.get("recent", []), maxlen=WINDOW),
                   points=[list(p) for p in data.get("points", [])], bucket=int(data.get("bucket", 1)),
                   steps=int(data.get("steps", 0)))
