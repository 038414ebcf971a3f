"""The progress board without Ray: bounded messages, progress coalesced, drops counted and reported."""

import pytest

from cluster.board import ProgressBoard


def _progress(cid: str, step: int) -> dict:
    return {"concept_id": cid, "stage": 1, "step": step, "total": 100, "loss": 0.1}


def _outcome(cid: str) -> dict:
    return {"concept_id": cid, "stage": 1, "status": "done", "output": f"out/{cid}"}


def test_progress_is_coalesced_to_the_newest_per_concept():
    board = ProgressBoard()
    for step in range(1, 1001):
        board.push("progress", _progress("a", step))
        board.push("progress", _progress("b", step))
    board.push("outcome", _outcome("b"))
    board.push("progress", _progress("a", 1001))
    msgs = board.drain()
    assert [(m["kind"], m["concept_id"], m.get("step")) for m in msgs] == [
        ("progress", "b", 1000), ("outcome", "b", None), ("progress", "a", 1001)]
    assert board.drain() == [] and board.stats() == {"pending": 0, "max_messages": board.max_messages,
                                                     "dropped": {}}


def test_a_coalesced_progress_message_keeps_the_newest_loss_curve_of_its_stage():
    board = ProgressBoard()
    board.push("progress", {**_progress("a", 1), "curve": {"points": [[1, 1, 0.5]], "bucket": 1, "steps": 1}})
    board.push("progress", _progress("a", 2))                     # no curve of its own: keeps step 1's
    board.push("progress", {**_progress("b", 1), "curve": {"points": [[1, 1, 0.4]], "bucket": 1, "steps": 1}})
    board.push("progress", {**_progress("b", 1), "stage": 2})     # another stage: stage 1's curve is not its
    msgs = {m["concept_id"]: m for m in board.drain()}
    assert msgs["a"]["step"] == 2 and msgs["a"]["curve"]["points"] == [[1, 1, 0.5]]
    assert msgs["b"]["stage"] == 2 and "curve" not in msgs["b"]
    board.push("progress", {**_progress("a", 3), "curve": {"points": [[1, 3, 0.3]], "bucket": 2, "steps": 3}})
    board.push("progress", _progress("a", 4))
    assert board.drain()[0]["curve"]["points"] == [[1, 3, 0.3]]   # the newest curve, never an older one


def test_messages_are_bounded_and_drops_are_counted_and_reported():
    board = ProgressBoard(max_messages=4)
    board.push("outcome", _outcome("a"))
    board.push("checkpoint", {"uri": "ck/p", "stage": 1, "members": [{"concept_id": "a", "job_key": "a", "step": 5}]})
    for i in range(5):
        board.push("event", {"concept_id": "a", "event": "resumed", "detail": {"i": i}})
    board.push("progress", _progress("a", 9))
    assert board.stats()["pending"] == 4
    assert board.stats()["dropped"] == {"event": 3, "progress": 1}
    msgs = board.drain()
    kinds = [m["kind"] for m in msgs]
    assert kinds == ["outcome", "checkpoint", "event", "event", "event"]   # outcome and checkpoint kept
    assert [m["detail"]["i"] for m in msgs[2:4]] == [3, 4]                  # the newest events kept
    assert msgs[-1]["event"] == "board-dropped" and msgs[-1]["concept_id"] is None
    assert msgs[-1]["detail"] == {"event": 3, "progress": 1}
    assert board.drain() == []                                              # reported once
    assert board.stats()["dropped"] == {"event": 3, "progress": 1}          # the running total stays
    assert board.latest_checkpoints(["a"], 1) == {"a": {"step": 5, "uri": "ck/p/a"}}


def test_outcomes_are_dropped_last():
    board = ProgressBoard(max_messages=2)
    for cid in "abc":
        board.push("outcome", _outcome(cid))
    msgs = board.drain()
    assert [m.get("concept_id") for m in msgs[:2]] == ["b", "c"]
    assert msgs[-1]["detail"] == {"outcome": 1}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="max_messages"):
        ProgressBoard(max_messages=0)
    with pytest.raises(ValueError, match="nonsense"):
        ProgressBoard().push("nonsense", {})


def test_a_worker_sends_its_loss_curve_at_the_first_and_last_step_and_every_few_seconds(monkeypatch):
    """``RayShell.on_metrics`` with a board that records what it is sent (the real one, called directly)."""
    import cluster.worker as worker
    from purecc.loss_curve import LossCurve

    board = ProgressBoard()

    class Direct:     # what ``board.push.remote`` is on a Ray actor handle, here a plain call
        push = type("P", (), {"remote": staticmethod(board.push)})

    shell = worker.RayShell.__new__(worker.RayShell)
    shell.board, shell._curve_sent = Direct(), {}
    shell.plan = type("Plan", (), {"name": "p"})()
    shell.run = type("Run", (), {"fault": None})()
    clock = [100.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: clock[0])
    curve, sent = LossCurve(), []
    for step in range(1, 8):
        curve.add(1.0 / step)
        clock[0] += 4.0
        shell.on_metrics({"concept_id": "a", "stage": 1, "step": step, "total": 7, "loss": 1.0 / step,
                          "loss_curve": curve})
        msg = board.drain()[0]
        assert "loss_curve" not in msg and msg["run"] == "p"
        if "curve" in msg and msg["curve"]["steps"] == step:
            sent.append(step)
            assert set(msg["curve"]) == {"points", "bucket", "steps"} and len(msg["curve"]["points"]) == step
    # step 1, then every CURVE_PUSH_S (10 s at 4 s a step: steps 4 and 7), and the last step
    assert sent == [1, 4, 7]
