"""Shared fixtures: the embedded tiny model and the sample concepts, built once per session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")
# The tiny model's ops are far too small for intra-op threads to pay off, and on a loaded 2-core
# machine OpenMP threads spinning at barriers make every op 10-100x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from purecc.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def sample_manifests(tmp_path_factory) -> dict[str, Path]:
    """The demo's three sample concepts (the testbed has five), as the tests' batches use them."""
    from purecc.testbed.samples import DEMO_CONCEPTS, write_sample_concepts

    written = write_sample_concepts(tmp_path_factory.mktemp("samples"))
    return {c.concept_id: written[c.concept_id] for c in DEMO_CONCEPTS}


@pytest.fixture()
def tiny_pipe(tiny_model_dir):
    """A freshly loaded pipeline (a bank is attached at most once per loaded model)."""
    from purecc.model import load_pipeline

    return load_pipeline(str(tiny_model_dir))
