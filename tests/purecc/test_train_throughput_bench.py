"""bench/train_throughput.py runs end to end at a smoke size and prints every line it reports."""

from __future__ import annotations

import re

import torch

from bench.train_throughput import main


def test_the_throughput_bench_runs_and_reports_each_line(capsys):
    threads = torch.get_num_threads()
    try:        # the bench sets its own thread count: the rest of the session keeps its own
        main(["--steps", "2", "--packs", "1,2", "--rounds", "1", "--resolution", "64"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for line in ("(a) stage-1 steps/s", "(b) stage 1 concept-steps/s", "(b) stage 2 concept-steps/s",
                 "(c) stage 2, pack 2"):
        assert line in out, out
    ratios = [float(r) for r in re.findall(r"ratio[^=]*= ([0-9.]+)x", out)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios), out
