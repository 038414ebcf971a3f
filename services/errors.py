"""Errors raised inside the service; ``services.app`` maps each to one HTTP status.

They cross Ray process boundaries (generator replica -> ingress replica), so every class keeps
all of its constructor arguments in ``args`` and pickles as is.
"""

from __future__ import annotations


class UnknownConcept(LookupError):
    """The registry has no servable concept with this id (HTTP 404)."""

    def __init__(self, concept_id: str, reason: str = "is not in the adapter registry"):
        super().__init__(concept_id, reason)
        self.concept_id, self.reason = concept_id, reason

    def __str__(self) -> str:
        return f"concept {self.concept_id!r} {self.reason}"


class ConceptUnservable(UnknownConcept):
    """The registry holds the concept but its entry is bad (a malformed manifest, a missing or unsafe
    file, ...): not servable (HTTP 404), with the reason, which never names a server path."""

    def __init__(self, concept_id: str, reason: str):
        prefix, lead = f"concept {concept_id}: ", "cannot be served: "
        detail = reason[len(prefix):] if reason.startswith(prefix) else reason
        super().__init__(concept_id, detail if detail.startswith(lead) else lead + detail)   # pickles as is


class ConceptUnloadable(ValueError):
    """The concept exists but its adapter cannot be loaded into this bank (HTTP 422)."""

    def __init__(self, concept_id: str, reason: str):
        super().__init__(concept_id, reason)
        self.concept_id, self.reason = concept_id, reason

    def __str__(self) -> str:
        return f"concept {self.concept_id!r} cannot be loaded: {self.reason}"


class ConceptUnreadable(ConceptUnloadable):
    """The registry could not be read just now (a storage error): the load failed, but the concept is
    not marked unloadable, so the next request tries again (HTTP 422, as its parent)."""


class SlotsBusy(RuntimeError):
    """No device slot could be freed in time: every slot is pinned by in-flight requests (HTTP 503)."""

    def __init__(self, needed: int, waited_s: float):
        super().__init__(needed, waited_s)
        self.needed, self.waited_s = needed, waited_s

    def __str__(self) -> str:
        return (f"all adapter slots are in use by in-flight requests; {self.needed} more were needed "
                f"and none freed up within {self.waited_s:.1f}s")


class TooManyConcepts(ValueError):
    """A request names more concepts than the bank has slots (HTTP 422 on ``concepts``)."""

    def __init__(self, requested: int, slots: int):
        super().__init__(requested, slots)
        self.requested, self.slots = requested, slots

    def __str__(self) -> str:
        return f"{self.requested} concepts requested, this service composes at most {self.slots} per request"
