"""The per-concept progress table (status and the live view of ``submit --wait``)."""

from __future__ import annotations

import io

import pytest

from cluster.ledger import JobLedger
from cluster.progress import LiveTable, format_eta, format_table
from cluster.spec import load_batch


@pytest.mark.parametrize("seconds,text", [(None, "-"), (0.4, "0s"), (59, "59s"), (61, "1m01s"), (3725, "1h02m")])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_table_and_live_view(tmp_path, batch_files):
    with JobLedger(tmp_path / "l.sqlite") as led:
        led.submit(load_batch(batch_files()).jobs())
        led.claim_driver("me")
        led.launch("p", 1, ["checkered-star"])
        led.record_progress([{"concept_id": "checkered-star", "stage": 1, "step": 3, "total": 6, "loss": 0.25,
                              "eta_s": 12.0}])
        led.fail("striped-circle", "data error: row 2 unreadable\nsecond line")
        led.request_cancel("checkered-star")
        table = format_table(led.jobs())
        lines = table.splitlines()
        assert lines[1].split()[:8] == ["checkered-star", "stage1", "(cancelling)", "1", "3/6", "0.2500", "12s", "1"]
        assert "failed" in lines[2] and lines[2].endswith("second line")
        out = io.StringIO()
        live = LiveTable(out, quiet_every=1e9)
        live(led.jobs())
        live(led.jobs())                       # nothing changed: not printed again
        led.request_cancel("dotted-diamond")
        live(led.jobs())
        # not a terminal: the header once, then only the rows that changed
        assert out.getvalue().count("CONCEPT") == 1 and out.getvalue().count("dotted-diamond") == 2
