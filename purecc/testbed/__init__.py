"""The synthetic testbed: a toy world to run and measure PureCC on without real SD3 weights.

None of the method (the rest of ``purecc``) imports this package; it builds on the method.

  world          the procedural, captioned 64 px toy world (scenes, captions, concept objects)
  samples        the three sample concepts drawn from it (``python -m purecc.testbed.samples``)
  pretrain       pretraining the tiny SD3 model on the world (``python -m purecc.testbed.pretrain OUT``)
  world_base     where the committed world base lives, and its checksums
  facts          what a world prompt asks for, as position-keyed facts
  reader         the world reader, a small CNN that reads facts and object embeddings off images
  train_reader   how the committed reader is trained and measured
  metrics        toy-world text alignment, concept fidelity, preservation and drift
  assets/        the committed samples, world base (``world-base``) and reader (``world-metric``)

The paper's real-world metrics (CLIP-T, CLIP-I, DINO) are in ``purecc.eval``.
"""

from .world_base import verify_world_base, world_base_path

__all__ = ["verify_world_base", "world_base_path"]
