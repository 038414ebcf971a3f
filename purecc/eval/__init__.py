"""Evaluation: toy-world metrics read by the project's world reader, and CLIP/DINO for real weights.

- ``facts``: what a world prompt asks for (position-keyed facts);
- ``reader``: the small CNN that reads facts and object embeddings off a 64 px world image;
- ``train_reader``: how the committed reader (``assets/world-metric``) is trained and measured;
- ``metrics``: text alignment, concept fidelity, preservation (same seed) and drift (unrelated prompts);
- ``clip_metrics``: CLIP-T, CLIP-I and DINO from local model folders.
"""

from .facts import caption_facts, concept_positions, scene_facts
from .metrics import (concept_fidelity, concept_references, drift_unrelated, preservation_same_seed,
                      text_alignment)
from .reader import load_reader, read_facts, world_metric_path

__all__ = ["caption_facts", "concept_positions", "scene_facts", "concept_fidelity", "concept_references",
           "drift_unrelated", "preservation_same_seed", "text_alignment", "load_reader", "read_facts",
           "world_metric_path"]
