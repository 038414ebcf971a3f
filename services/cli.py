"""``purecc`` subcommands for the Ray Serve service (serve)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``purecc`` parser."""
