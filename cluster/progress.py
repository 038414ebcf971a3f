"""Per-concept progress as text: a status table and a live view for ``purecc submit --wait``."""

from __future__ import annotations

import sys
import time
from typing import Sequence, TextIO

from .ledger import JobRecord

COLUMNS = ("CONCEPT", "STATE", "STAGE", "STEP", "LOSS", "ETA", "RUNS", "NOTE")


def format_eta(seconds: float | None) -> str:
    """Seconds as ``1h02m``, ``3m05s`` or ``42s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def row_of(job: JobRecord) -> tuple[str, ...]:
    """One job's table cells, in ``COLUMNS`` order."""
    training = job.state in ("stage1", "stage2") and job.stage is not None
    state = job.state + (" (cancelling)" if job.cancel_requested and job.state in ("stage1", "stage2") else "")
    step = f"{job.step}/{job.total}" if job.step is not None else "-"
    loss = f"{job.loss:.4f}" if job.loss is not None else "-"
    note = (job.error or "").strip().splitlines()[-1][:70] if job.state == "failed" and job.error else ""
    if job.state == "published":
        note = job.adapter or ""
    return (job.concept_id, state, str(job.stage or "-"), step, loss,
            format_eta(job.eta_s) if training else "-", str(job.attempts), note)


def format_table(jobs: Sequence[JobRecord]) -> str:
    """The jobs as a text table with aligned columns and a header row."""
    rows = [COLUMNS] + [row_of(j) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


class LiveTable:
    """Redraws the table in place on a terminal (at most every ``interval`` s); elsewhere prints it
    again only when some job changes state (and every ``quiet_every`` s)."""

    def __init__(self, stream: TextIO = sys.stdout, interval: float = 1.0, quiet_every: float = 30.0):
        self.stream, self.interval, self.quiet_every = stream, interval, quiet_every
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last, self._lines, self._states = 0.0, 0, None

    def __call__(self, jobs: Sequence[JobRecord]) -> None:
        now = time.time()
        states = tuple((j.concept_id, j.state) for j in jobs)
        if self.tty and now - self._last >= self.interval:
            table = format_table(jobs)
            self.stream.write(f"\x1b[{self._lines}F\x1b[J" if self._lines else "")
            self.stream.write(table + "\n")
            self._lines = table.count("\n") + 1
        elif not self.tty and (states != self._states or now - self._last >= self.quiet_every):
            self.stream.write(time.strftime("%H:%M:%S ") + "\n" + format_table(jobs) + "\n")
        else:
            return
        self.stream.flush()
        self._last, self._states = now, states

    def final(self, jobs: Sequence[JobRecord]) -> None:
        """Print the table now, whatever changed or however recently it was drawn."""
        self._last = 0.0
        self._states = None
        self(jobs)
