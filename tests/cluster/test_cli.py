"""``purecc submit/status/cancel/concepts`` without running anything (no Ray)."""

from __future__ import annotations

import json

import pytest

from purecc.cli import main


def test_queue_status_cancel(batch_files, capsys, tmp_path):
    batch = batch_files()
    assert main(["submit", str(batch), "--queue-only"]) == 0
    assert "3 new" in capsys.readouterr().out
    assert main(["submit", str(batch), "--queue-only"]) == 0
    assert "0 new, 3 unchanged" in capsys.readouterr().out
    assert main(["status", "--batch", str(batch)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:6] == ["CONCEPT", "STATE", "STAGE", "STEP", "LOSS", "ETA"]
    assert out.count("queued") == 3
    assert main(["cancel", "checkered-star", "--batch", str(batch)]) == 0
    assert main(["cancel", "checkered-star", "--batch", str(batch)]) == 0
    out = capsys.readouterr().out
    assert "checkered-star: cancelled" in out and "already cancelled" in out
    ledger = str(tmp_path / "store" / "ledger.sqlite")
    assert main(["status", "checkered-star", "--json", "--ledger", ledger]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["state"] == "cancelled" and rec["spec"]["trigger"] == "zqx"
    assert main(["concepts", "--ledger", ledger, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_errors_are_clear(batch_files, capsys, monkeypatch):
    monkeypatch.delenv("PURECC_LEDGER", raising=False)
    assert main(["status"]) == 2
    assert "no ledger" in capsys.readouterr().err
    batch = batch_files()
    main(["submit", str(batch), "--queue-only"])
    assert main(["cancel", "nope", "--batch", str(batch)]) == 2
    assert "not in the ledger" in capsys.readouterr().err


def test_changed_batch_needs_replace(batch_files, capsys):
    main(["submit", str(batch_files("a.yaml")), "--queue-only"])
    changed = batch_files("b.yaml", defaults={"resolution": 64, "seed": 5})
    assert main(["submit", str(changed), "--queue-only"]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["submit", str(changed), "--queue-only", "--replace"]) == 0
    assert "3 replaced" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", ["submit", "status", "cancel", "resume", "concepts"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0 and "usage: purecc " + cmd in capsys.readouterr().out



def _wait_exit(pid: int, timeout_s: float) -> int | None:
    """The exit code of child ``pid`` once it ends (0 if reaped elsewhere), or None after ``timeout_s``."""
    import os
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:          # already reaped by subprocess's own clean-up
            return 0
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.2)
    return None


@pytest.mark.ray
def test_start_driver_without_ray_spawns_a_detached_resume_process(tmp_path, monkeypatch):
    import os
    import signal
    import sys

    from cluster import api
    from cluster.ledger import JobLedger

    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "this test needs Ray not initialised in this process"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ledger = tmp_path / "ledger.sqlite"
    with JobLedger(ledger):
        pass                                   # no job: the driver has nothing to do and exits
    started = api.start_driver(ledger, num_cpus=1)
    assert started.kind == "process" and started.pid
    code = None
    try:
        code = _wait_exit(started.pid, 120)
    finally:
        if code is None:                       # still running: end its session and reap it
            os.killpg(started.pid, signal.SIGKILL)
            os.waitpid(started.pid, 0)
    (log,) = (tmp_path / "logs").glob("driver-*.log")
    assert code == 0, f"purecc resume: exit {code} (None: still running after 120 s)\n{log.read_text()}"
    assert "CONCEPT" in log.read_text()        # `purecc resume` printed its (empty) final table
