"""Evaluation with the paper's real-world metrics, for users with local CLIP/DINOv2 weights.

- ``clip_metrics``: CLIP-T, CLIP-I and DINO from local model folders (nothing is downloaded).

The toy-world metrics and the world reader that scores them belong to the synthetic testbed:
``purecc.testbed.facts``, ``purecc.testbed.reader``, ``purecc.testbed.train_reader`` and
``purecc.testbed.metrics``.
"""

from .clip_metrics import ClipScorer, DinoScorer

__all__ = ["ClipScorer", "DinoScorer"]
