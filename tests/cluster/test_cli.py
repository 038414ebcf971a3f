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
    assert main(["cancel", "zigzag-star", "--batch", str(batch)]) == 0
    assert main(["cancel", "zigzag-star", "--batch", str(batch)]) == 0
    out = capsys.readouterr().out
    assert "zigzag-star: cancelled" in out and "already cancelled" in out
    ledger = str(tmp_path / "store" / "ledger.sqlite")
    assert main(["status", "zigzag-star", "--json", "--ledger", ledger]) == 0
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
