"""Fixtures for the service tests: a registry of adapters for the tiny model.

Random adapters (``random_adapter``) change the image strongly, so a routing mistake cannot hide
behind a near-no-op adapter; trained ones come from ``purecc.trainer`` like real concepts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from purecc.adapter_files import AdapterManifest, export_slot
from purecc.bank import attach_bank
from purecc.model import base_fingerprint, load_pipeline
from purecc.registry import AdapterRegistry


class AdapterFactory:
    """Writes adapters for the tiny model into staging folders and publishes them."""

    def __init__(self, model_dir: Path, staging: Path):
        pipe = load_pipeline(str(model_dir))
        self.fingerprint = base_fingerprint(pipe.transformer)
        self.bank = attach_bank(pipe.transformer, 1)
        self.staging = staging

    def flat(self, seed: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(self.bank.params_per_slot, generator=torch.Generator().manual_seed(seed)) * scale

    def write(self, concept_id: str, seed: int, *, trigger: str | None = None, scale: float = 0.15,
              fingerprint: str | None = None) -> Path:
        manifest = AdapterManifest(concept_id=concept_id, trigger=trigger or f"t{seed}x", stage=2, steps=1,
                                   rank=self.bank.rank, alpha=self.bank.alpha, targets=[],
                                   base_fingerprint=fingerprint or self.fingerprint)
        dest = self.staging / f"{concept_id}-{seed}"
        return export_slot(self.bank, self.flat(seed, scale), dest, manifest)

    def publish(self, registry: AdapterRegistry, concept_id: str, seed: int, **kwargs) -> Path:
        folder = self.write(concept_id, seed, **kwargs)
        registry.publish(concept_id, folder)
        return folder


@pytest.fixture(scope="session")
def adapter_factory(tiny_model_dir, tmp_path_factory) -> AdapterFactory:
    return AdapterFactory(tiny_model_dir, tmp_path_factory.mktemp("adapter-staging"))
