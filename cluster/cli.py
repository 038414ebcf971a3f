"""``purecc`` subcommands for concept batches (submit, status, cancel, resume, concepts)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``purecc`` parser."""
