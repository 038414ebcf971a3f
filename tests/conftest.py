"""Shared fixtures: the embedded tiny model and the sample concepts, built once per session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from purecc.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def sample_manifests(tmp_path_factory) -> dict[str, Path]:
    from purecc.samples import write_sample_concepts

    return write_sample_concepts(tmp_path_factory.mktemp("samples"))


@pytest.fixture()
def tiny_pipe(tiny_model_dir):
    """A freshly loaded pipeline (a bank is attached at most once per loaded model)."""
    from purecc.model import load_pipeline

    return load_pipeline(str(tiny_model_dir))
