"""Helpers for the multi-node tests."""

from __future__ import annotations

import subprocess


def cluster_pids(temp: str) -> set[int]:
    """Ray processes of the cluster whose session lives under ``temp`` (not another test's Ray)."""
    import psutil

    return {p.pid for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])}


def listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses the given processes listen on (TCP), from ``ss``."""
    out = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            host = line.split()[3].rsplit(":", 1)[0].strip("[]")
            found.add(host.removeprefix("::ffff:"))    # an IPv4-mapped address is the IPv4 one
    return found
