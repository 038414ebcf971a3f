"""Per-concept progress as text: a status table and a live view for ``submit --wait`` / ``status --watch``.

The rendering is pure functions (rows, table, the escape codes of a redraw, the lines a plain log
gets); ``LiveTable`` only decides when to write them. On a terminal the table is redrawn in place
(ANSI: cursor up to the table's first line, each line cleared and rewritten, anything left below
cleared); elsewhere (a pipe, a CI log) only the rows that changed are printed, a state change at
once and step progress at most every ``quiet_every`` seconds. Hand-written because the escape codes
needed are three and the table is already ours (``rich``/``curses`` would add a dependency for it).
"""

from __future__ import annotations

import sys
import time
from typing import Mapping, Sequence, TextIO

from .ledger import JobRecord

COLUMNS = ("CONCEPT", "STATE", "STAGE", "STEP", "LOSS", "ETA", "RUNS", "NOTE")
TRAINING = {"stage1": 1, "stage2": 2}
CURSOR_UP_TO_START = "\x1b[{n}F"    # CPL: n lines up, to the first column
CLEAR_LINE = "\x1b[2K"              # EL 2: the whole line
CLEAR_BELOW = "\x1b[J"              # ED 0: from the cursor to the end of the screen


def format_eta(seconds: float | None) -> str:
    """Seconds as ``1h02m``, ``3m05s`` or ``42s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_of(job: JobRecord) -> tuple[int, int] | None:
    """(step, total) of the stage a training job is in, from its first moment: before the worker's
    first report (loading, caching latents) the step is 0 of the stage's recipe steps."""
    stage = TRAINING.get(job.state)
    if stage is None:
        return None
    if job.stage == stage and job.step is not None:
        return job.step, job.total or job.spec.recipe(stage).steps
    return 0, job.spec.recipe(stage).steps


def eta_of(job: JobRecord, now: float) -> float | None:
    """Seconds left in the current stage: the driver's estimate aged to ``now``, else the mean step
    time since the stage started; None before any step."""
    stage = TRAINING.get(job.state)
    prog = progress_of(job)
    if stage is None or prog is None or prog[0] == 0:
        return None
    if job.eta_s is not None and job.progress_at is not None:
        return max(0.0, job.eta_s - max(0.0, now - job.progress_at))
    started = job.stage1_started if stage == 1 else job.stage2_started
    if started is None or job.progress_at is None:
        return None
    step, total = prog
    return (job.progress_at - started) / step * (total - step) - max(0.0, now - job.progress_at)


def row_of(job: JobRecord, now: float | None = None) -> tuple[str, ...]:
    """One job's table cells, in ``COLUMNS`` order (``now``: for the ETA; default the progress time)."""
    prog = progress_of(job)
    state = job.state + (" (cancelling)" if job.cancel_requested and prog is not None else "")
    step = f"{prog[0]}/{prog[1]}" if prog is not None else "-"
    loss = f"{job.loss:.4f}" if job.loss is not None and prog is not None and prog[0] > 0 else "-"
    note = (job.error or "").strip().splitlines()[-1][:70] if job.state == "failed" and job.error else ""
    if job.state == "published":
        note = job.adapter or ""
    eta = eta_of(job, now if now is not None else (job.progress_at or 0.0)) if prog is not None else None
    return (job.concept_id, state, str(TRAINING.get(job.state) or job.stage or "-"), step, loss,
            format_eta(eta), str(job.attempts), note)


def table_lines(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows under the header, columns aligned (the last, free-text column is not padded)."""
    rows = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return [("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1]).rstrip() for r in rows]


def format_table(jobs: Sequence[JobRecord], now: float | None = None) -> str:
    """The jobs as a text table with aligned columns and a header row."""
    return "\n".join(table_lines([row_of(j, now) for j in jobs]))


def redraw(previous: int, lines: Sequence[str]) -> str:
    """What a terminal gets to replace the ``previous`` lines drawn with ``lines``, in place."""
    head = CURSOR_UP_TO_START.format(n=previous) if previous else ""
    body = "".join(f"{CLEAR_LINE}{line}\n" for line in lines)
    return head + body + (CLEAR_BELOW if len(lines) < previous else "")


def changed_rows(previous: Mapping[str, tuple[str, ...]], rows: Sequence[tuple[str, ...]], *,
                 progress: bool) -> list[tuple[str, ...]]:
    """The rows a plain log prints: new concepts and state changes, and (``progress``) any other change."""
    out = []
    for row in rows:
        before = previous.get(row[0])
        if before is None or before[1] != row[1] or (progress and before != row):
            out.append(row)
    return out


class LiveTable:
    """Writes the jobs' table as it changes: redrawn in place on a terminal (at most every
    ``interval`` s), elsewhere only the changed rows (``changed_rows``; progress every ``quiet_every`` s)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 1.0, quiet_every: float = 30.0,
                 tty: bool | None = None):
        stream = sys.stdout if stream is None else stream   # the stdout of now (tests redirect it)
        self.stream, self.interval, self.quiet_every = stream, interval, quiet_every
        self.tty = (hasattr(stream, "isatty") and stream.isatty()) if tty is None else tty
        self._drawn, self._last_draw, self._last_progress = 0, 0.0, 0.0
        self._rows: dict[str, tuple[str, ...]] = {}

    def __call__(self, jobs: Sequence[JobRecord], *, force: bool = False) -> None:
        self.draw([row_of(j, time.time()) for j in jobs], force=force)

    def draw(self, rows: Sequence[tuple[str, ...]], *, force: bool = False) -> None:
        """Write ``rows`` (cells in ``COLUMNS`` order, the first the concept id) as the table now is."""
        now = time.time()
        if self.tty:
            if not force and now - self._last_draw < self.interval:
                return
            lines = table_lines(rows)
            self.stream.write(redraw(self._drawn, lines))
            self._drawn, self._last_draw = len(lines), now
        else:
            progress = force or now - self._last_progress >= self.quiet_every
            changed = {r[0] for r in changed_rows(self._rows, rows, progress=progress)}
            if progress:
                self._last_progress = now
            if not changed:
                return
            stamp = time.strftime("%H:%M:%S")
            lines = table_lines(rows)      # aligned as the whole table is, whichever rows are printed
            out = [] if self._rows else [f"{' ' * len(stamp)}  {lines[0]}"]
            out += [f"{stamp}  {line}" for row, line in zip(rows, lines[1:]) if row[0] in changed]
            self.stream.write("\n".join(out) + "\n")
        self._rows = {r[0]: r for r in rows}
        self.stream.flush()

    def final(self, jobs: Sequence[JobRecord]) -> None:
        """Write the table's last state now, however recently it was drawn."""
        self(jobs, force=True)
