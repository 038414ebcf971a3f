"""The ingress's view of the registry: manifests cached for a short TTL; unknown ids always re-read.

So a concept published while the service runs is found on its first request, and a re-published
one is picked up within ``ttl_s`` (its new weights' sha256 becomes the version the generator loads).
A concept whose registry entry is bad is never cached: ``lookup`` raises ``ConceptUnservable``
(HTTP 404 with the reason) and ``list`` leaves it out; both log why.
"""

from __future__ import annotations

import asyncio
import logging
import time

from purecc.adapter_files import AdapterFileError, AdapterManifest
from purecc.registry import AdapterRegistry

from .errors import ConceptUnservable

log = logging.getLogger(__name__)


class ConceptCatalog:
    """Registry manifests cached for ``ttl_s`` seconds; misses are never cached."""

    def __init__(self, registry: AdapterRegistry, ttl_s: float = 2.0):
        self.registry, self.ttl_s = registry, ttl_s
        self._manifests: dict[str, tuple[float, AdapterManifest]] = {}

    async def lookup(self, concept_id: str) -> AdapterManifest | None:
        """The manifest of ``concept_id`` (cached up to ``ttl_s``), or None when it is not published.

        Raises ``ConceptUnservable`` (with the reason) when its registry entry is bad.
        """
        cached = self._manifests.get(concept_id)
        if cached is not None and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        try:
            manifest = await asyncio.to_thread(self.registry.manifest, concept_id)
        except AdapterFileError as exc:
            self._manifests.pop(concept_id, None)
            log.warning("catalog: concept %s cannot be served: %s", concept_id, exc)
            raise ConceptUnservable(concept_id, str(exc)) from None
        if manifest is None:
            self._manifests.pop(concept_id, None)
        else:
            self._manifests[concept_id] = (time.monotonic(), manifest)
        return manifest

    async def list(self) -> list[AdapterManifest]:
        """Every servable manifest, read afresh (bad entries are logged and left out); refreshes the cache."""
        manifests = await asyncio.to_thread(self.registry.list)
        now = time.monotonic()
        self._manifests = {m.concept_id: (now, m) for m in manifests}
        return manifests
