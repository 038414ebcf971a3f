"""A reader racing a writer over one registry concept: shared by the local and the S3 registry tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from purecc.registry import AdapterRegistry


def replace_while_reading(root: str | Path, concept_id: str, folders: list[Path],
                          check: Callable[[AdapterRegistry, set[str]], str], *, join_s: float = 120.0,
                          max_reads: int = 10_000) -> tuple[list[str], list[str], set[str]]:
    """Publish ``folders[0]``, then replace the concept with each next folder while a thread keeps
    calling ``check(reader, published)`` on its own registry object. ``check`` returns the version it
    saw, or a message starting ``"problem: "``; an exception it raises is a problem too. Returns
    (problems, seen versions, published versions)."""
    writer = AdapterRegistry(root)
    writer.publish(concept_id, folders[0])
    published = {writer.current(concept_id)[0]}
    seen: list[str] = []
    problems: list[str] = []
    stop = threading.Event()

    def read() -> None:
        reader = AdapterRegistry(root)
        n = 0
        while (not stop.is_set() or n < 3) and n < max_reads:
            n += 1
            try:
                got = check(reader, published)
            except Exception as exc:        # noqa: BLE001 - any failure is what the tests look for
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            (problems if got.startswith("problem: ") else seen).append(got)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for folder in folders[1:]:
            writer.publish(concept_id, folder)
            published.add(writer.current(concept_id)[0])
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(join_s)
    if thread.is_alive():
        problems.append(f"the reader did not stop within {join_s} s")
    return problems, seen, published
