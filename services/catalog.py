"""The ingress's view of the registry: manifests cached for a short TTL; unknown ids always re-read.

So a concept published while the service runs is found on its first request, and a re-published
one is picked up within ``ttl_s`` (its new weights' sha256 becomes the version the generator loads).
A concept whose registry entry is bad is never cached: ``lookup`` raises ``ConceptUnservable``
(HTTP 404 with the reason) and ``list`` leaves it out; both log why. ``list`` also checks every
version fully once (hashes, safetensors, finite weights: ``AdapterRegistry.verify``) and keeps
the verdict, which stays true because versions never change; a request for a concept whose files
are bad in a way only that full check sees is answered 422 by the generator's load.
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
        self._verdicts: dict[tuple[str, str], str | None] = {}     # (id, version) -> why unservable, or None

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
        except OSError as exc:           # storage trouble: answered with the reason, never a 500
            log.warning("catalog: concept %s: the registry cannot be read: %r", concept_id, exc)
            raise ConceptUnservable(concept_id, f"its registry entry cannot be read now ({type(exc).__name__})") \
                from None
        if manifest is None:
            self._manifests.pop(concept_id, None)
        else:
            self._manifests[concept_id] = (time.monotonic(), manifest)
        return manifest

    async def list(self) -> list[AdapterManifest]:
        """Every servable manifest, read afresh (bad entries are logged and left out); refreshes the cache."""
        manifests = await asyncio.to_thread(self._servable)
        now = time.monotonic()
        self._manifests = {m.concept_id: (now, m) for m in manifests}
        return manifests

    def _servable(self) -> list[AdapterManifest]:
        out = []
        for entry in self.registry.scan():
            if not entry.servable:
                if entry.reason != "no published version":
                    log.warning("catalog: concept %s cannot be served: %s", entry.concept_id, entry.reason)
                continue
            key = (entry.concept_id, entry.version)
            if key not in self._verdicts:
                try:
                    self.registry.verify(entry.concept_id, entry.version)
                    self._verdicts[key] = None
                except (KeyError, AdapterFileError) as exc:
                    self._verdicts[key] = str(exc)
                    log.warning("catalog: concept %s cannot be served: %s", entry.concept_id, exc)
            if self._verdicts[key] is None:
                out.append(entry.manifest)
        return out
