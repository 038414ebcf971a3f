"""Rendering of the live progress table: progress from the first step, ETA, in-place redraw, plain log."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

from cluster.ledger import JobLedger
from cluster.progress import (CLEAR_BELOW, CLEAR_LINE, LiveTable, changed_rows, eta_of, progress_of, redraw,
                              row_of, table_lines)
from cluster.spec import load_batch


@pytest.fixture()
def job(tmp_path, batch_files):
    """A queued job record of the sample batch (stage 1: 6 steps, stage 2: 4 steps in the fixture)."""
    with JobLedger(tmp_path / "l.sqlite") as led:
        led.submit(load_batch(batch_files()).jobs())
        return led.jobs()[0]


def test_progress_shows_from_the_first_moment_of_a_stage(job):
    total1, total2 = job.spec.recipe(1).steps, job.spec.recipe(2).steps
    assert progress_of(job) is None and row_of(job)[3] == "-"          # queued
    starting = replace(job, state="stage1", stage=None, step=None, total=None)
    assert progress_of(starting) == (0, total1)
    assert row_of(starting)[2:6] == ("1", f"0/{total1}", "-", "-")
    # stage 2 began: the stage-1 progress of the ledger row is not shown as stage 2's
    stage2 = replace(job, state="stage2", stage=1, step=total1, total=total1, loss=0.5)
    assert progress_of(stage2) == (0, total2) and row_of(stage2)[2:5] == ("2", f"0/{total2}", "-")
    running = replace(stage2, stage=2, step=1, total=total2, loss=0.25)
    assert row_of(running)[3:5] == (f"1/{total2}", "0.2500")


def test_eta_from_the_driver_aged_or_from_the_step_rate(job):
    reported = replace(job, state="stage1", stage=1, step=2, total=10, eta_s=40.0, progress_at=100.0)
    assert eta_of(reported, now=100.0) == 40.0 and eta_of(reported, now=110.0) == 30.0
    assert eta_of(reported, now=1000.0) == 0.0
    assert row_of(reported, now=105.0)[5] == "35s"
    # no driver estimate yet (one report): mean step time since the stage started
    first = replace(reported, eta_s=None, stage1_started=90.0)
    assert eta_of(first, now=100.0) == pytest.approx(10.0 / 2 * 8)
    assert eta_of(replace(first, step=None, stage=None), now=100.0) is None    # no step yet: unknown


def test_redraw_moves_up_clears_and_rewrites_in_place():
    assert redraw(0, ["a", "b"]) == f"{CLEAR_LINE}a\n{CLEAR_LINE}b\n"
    assert redraw(2, ["c", "d"]) == f"\x1b[2F{CLEAR_LINE}c\n{CLEAR_LINE}d\n"
    assert redraw(3, ["e"]) == f"\x1b[3F{CLEAR_LINE}e\n{CLEAR_BELOW}"


def test_changed_rows_for_a_plain_log():
    a, b = ("a", "stage1", "1", "1/6"), ("b", "queued", "-", "-")
    assert changed_rows({}, [a, b], progress=False) == [a, b]
    moved = ("a", "stage1", "1", "2/6")
    assert changed_rows({"a": a, "b": b}, [moved, b], progress=False) == []
    assert changed_rows({"a": a, "b": b}, [moved, b], progress=True) == [moved]
    started = ("b", "stage1", "1", "0/6")
    assert changed_rows({"a": a, "b": b}, [a, started], progress=False) == [started]


def test_table_lines_align_columns():
    lines = table_lines([("long-concept-id", "stage1", "1", "0/6", "-", "-", "1", ""), ("x", "queued", "-", "-",
                                                                                         "-", "-", "0", "note")])
    assert lines[0].index("STATE") == lines[1].index("stage1") == lines[2].index("queued")
    assert lines[2].endswith("note") and not lines[1].endswith(" ")


def test_live_table_on_a_terminal_redraws_one_table(job):
    out = io.StringIO()
    live = LiveTable(out, interval=0.0, tty=True)
    jobs = [replace(job, state="stage1", stage=1, step=s, total=6, loss=0.1) for s in (1, 2)]
    live([jobs[0]])
    live([jobs[1]])
    text = out.getvalue()
    assert text.count("\x1b[2F") == 1 and text.count("CONCEPT") == 2 and "2/6" in text.split("\x1b[2F")[1]
    live([jobs[1]])   # interval 0: drawn again, still in place
    assert out.getvalue().count("\x1b[2F") == 2


def test_live_table_plain_prints_only_changed_rows(job):
    out = io.StringIO()
    live = LiveTable(out, tty=False, quiet_every=1e9)
    other = replace(job, concept_id="other-concept")
    live([job, other])
    live([replace(job, state="stage1", stage=1, step=1, total=6), other])            # state change: printed
    live([replace(job, state="stage1", stage=1, step=2, total=6), other])            # step only: not yet
    lines = out.getvalue().splitlines()
    assert sum("CONCEPT" in line for line in lines) == 1                              # the header once
    assert [line.split()[1] for line in lines[1:]] == [job.concept_id, "other-concept", job.concept_id]
    assert "\x1b" not in out.getvalue()
    live.final([replace(job, state="stage1", stage=1, step=2, total=6), other])       # final: progress too
    assert out.getvalue().splitlines()[-1].split()[4] == "2/6"


def test_status_watch_follows_the_ledger_until_no_job_is_active(tmp_path, batch_files, monkeypatch):
    import sys
    import threading
    import time

    from purecc.cli import main

    ledger = tmp_path / "l.sqlite"
    with JobLedger(ledger) as led:
        led.submit(load_batch(batch_files()).jobs())
        ids = [j.concept_id for j in led.jobs()]
        for cid in ids[1:]:
            led.request_cancel(cid)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)   # not a terminal: the plain log

    def cancel_once_shown():
        """Cancel the last active job once the watch has printed it queued (no race with its start)."""
        deadline = time.time() + 120
        while "queued" not in out.getvalue() and time.time() < deadline:
            time.sleep(0.05)
        with JobLedger(ledger) as led:
            led.request_cancel(ids[0])

    thread = threading.Thread(target=cancel_once_shown, daemon=True)
    thread.start()
    assert main(["status", ids[0], "--watch", "--interval", "0.1", "--ledger", str(ledger)]) == 0
    thread.join(timeout=10)
    lines = out.getvalue().splitlines()
    assert [line.split()[1:3] for line in lines[1:]] == [[ids[0], "queued"], [ids[0], "cancelled"]]
    assert all(cid not in "\n".join(lines) for cid in ids[1:])


def test_the_http_status_and_its_table_show_what_purecc_status_shows(job, tmp_path):
    import time

    from services.batches import job_status
    from services.client import status_row

    total1 = job.spec.recipe(1).steps
    starting = replace(job, state="stage1", stage=None, step=None, total=None)
    now = time.time()
    running = replace(job, state="stage1", stage=1, step=2, total=total1, loss=0.25, eta_s=40.0, progress_at=now)
    published = replace(job, state="published", stage=2, step=4, total=4, adapter=str(tmp_path / "adapters/x/v1"))
    for rec in (job, starting, running, published):
        body = job_status(rec, tmp_path).model_dump(mode="json")
        ours, theirs = status_row(body), row_of(rec, now)
        assert ours[:5] == theirs[:5] and ours[6] == theirs[6], (ours, theirs)     # concept .. loss, runs
    # from the first moment of a stage: step 0 of the recipe's steps, in the stage it is in
    first = job_status(starting, tmp_path)
    assert (first.stage, first.step, first.total, first.eta_s) == (1, 0, total1, None)
    eta = job_status(running, tmp_path).eta_s
    assert eta is not None and 39.0 <= eta <= 40.0 and status_row(job_status(running, tmp_path).model_dump())[5] in (
        "40s", "39s")
    assert status_row(job_status(published, tmp_path).model_dump())[7] == "adapters/x/v1"     # storage-relative


def test_submit_wait_draws_one_table_in_place_on_a_terminal():
    stream = io.StringIO()
    table = LiveTable(stream, interval=0.0, tty=True)
    queued = {"id": "a", "state": "queued", "attempts": 0}
    from services.client import status_row

    table.draw([status_row(queued)])
    table.draw([status_row({**queued, "state": "stage1", "stage": 1, "step": 0, "total": 6, "attempts": 1})])
    out = stream.getvalue()
    assert out.count("CONCEPT") == 2 and "\x1b[2F" in out and "0/6" in out     # redrawn over the first table
