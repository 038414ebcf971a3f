"""Helpers of the service tests: API tokens, their headers, auth settings for test services, and
adapters for the tiny model (random ones change the image strongly, so a routing mistake cannot hide
behind a near-no-op adapter)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from purecc.adapter_files import AdapterManifest, export_slot
from purecc.bank import attach_bank, attach_clip_tokens
from purecc.model import base_fingerprint, load_pipeline
from purecc.registry import AdapterRegistry
from services.auth import AuthSettings, TokenStore

# the HTTP tests send bursts of requests: rate limits well above them (test_auth_http tests the limits)
ROOMY = dict(requests_per_minute=60_000, burst=1_000)


def make_token(tokens_file: Path, owner: str, *scopes: str) -> str:
    """A new token in ``tokens_file`` for ``owner`` with ``scopes`` (default: generate and submit)."""
    return TokenStore(tokens_file).create(owner, list(scopes) or ["generate", "submit"])[1]


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of ``token``."""
    return {"Authorization": f"Bearer {token}"}


def roomy_auth(tokens_file: Path, **extra) -> AuthSettings:
    """Auth on, tokens from ``tokens_file``, limits that the functional tests never reach."""
    return AuthSettings(tokens=str(tokens_file), **{**ROOMY, **extra})


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AdapterFactory:
    """Writes adapters for the tiny model into staging folders and publishes them."""

    def __init__(self, model_dir: Path, staging: Path):
        pipe = load_pipeline(str(model_dir))
        self.fingerprint = base_fingerprint(pipe.transformer)
        self.bank = attach_bank(pipe.transformer, 1)
        attach_clip_tokens(pipe, self.bank)
        self.staging = staging

    def flat(self, seed: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(self.bank.params_per_slot, generator=torch.Generator().manual_seed(seed)) * scale

    def embeddings(self, seed: int, form: str = "layerwise") -> torch.Tensor:
        shape, scale = (self.bank.tokens.shape, 0.5) if form == "clip-token" else (self.bank.embeddings.shape, 2.0)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale

    def write(self, concept_id: str, seed: int, *, trigger: str | None = None, scale: float = 0.15,
              fingerprint: str | None = None, embeddings: bool | str = False, emb_seed: int | None = None) -> Path:
        """A random adapter (and, with ``embeddings``, random embeddings drawn from ``emb_seed``, by default
        ``seed + 1``: layer-wise for True, or the form named) for ``concept_id``."""
        manifest = AdapterManifest(concept_id=concept_id, trigger=trigger or f"t{seed}x", stage=2, steps=1,
                                   rank=self.bank.rank, alpha=self.bank.alpha, targets=[],
                                   base_fingerprint=fingerprint or self.fingerprint)
        dest = self.staging / f"{concept_id}-{seed}-{emb_seed}"
        emb = None
        if embeddings:
            emb = self.embeddings(seed + 1 if emb_seed is None else emb_seed,
                                  embeddings if isinstance(embeddings, str) else "layerwise")
        return export_slot(self.bank, self.flat(seed, scale), dest, manifest, emb=emb)

    def publish(self, registry: AdapterRegistry, concept_id: str, seed: int, **kwargs) -> Path:
        folder = self.write(concept_id, seed, **kwargs)
        registry.publish(concept_id, folder)
        return folder
