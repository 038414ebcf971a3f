"""Keep every model load offline: the project never downloads weights."""

from __future__ import annotations

import os


def force_offline() -> None:
    """Set the Hugging Face offline switches before any hub-aware library resolves a path."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def quiet_libraries() -> None:
    """Silence per-load progress bars and advisory logging of diffusers/transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
