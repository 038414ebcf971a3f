"""TensorBoard event files of a training run (diffusers' ``--report_to tensorboard``), optional.

One ``SummaryWriter`` per concept under ``<log_dir>/<concept_id>/`` so that TensorBoard shows each
concept as its own run; tags are per stage (``stage1/loss``, ``stage2/lambda``, ``stage2/l_pure``,
``stage1/validation/00``...) with the stage's step as the global step. ``torch.utils.tensorboard``
is imported only when the logger is made: training without it never needs the package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .ids import validate_concept_id

SCALARS = ("loss", "l_cc", "l_pure", "lambda", "cos_r", "sigma", "grad_norm", "lr", "loss_scale")


class TensorBoardLogger:
    """Writes per-concept scalars and validation images as TensorBoard event files (``PackLogger``)."""

    def __init__(self, log_dir: str | Path, flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # the tensorboard package is an optional dependency
            raise ValueError("--tensorboard: the tensorboard package is not installed "
                             "(pip install tensorboard)") from exc
        self._writer_cls, self.log_dir, self.flush_secs = SummaryWriter, Path(log_dir), flush_secs
        self._writers: dict = {}

    def _writer(self, concept_id: str):
        if concept_id not in self._writers:
            folder = self.log_dir / validate_concept_id(concept_id)
            self._writers[concept_id] = self._writer_cls(log_dir=str(folder), flush_secs=self.flush_secs)
        return self._writers[concept_id]

    def log_metrics(self, metrics: dict) -> None:
        """One step of one concept (the trainer's ``on_metrics`` dict): every known scalar in it."""
        w, stage, step = self._writer(metrics["concept_id"]), metrics["stage"], int(metrics["step"])
        for key in SCALARS:
            if isinstance(metrics.get(key), (int, float)):
                w.add_scalar(f"stage{stage}/{key}", float(metrics[key]), step)

    def log_images(self, concept_id: str, stage: int, step: int, images: list[Path], prompts: list[str]) -> None:
        """Validation PNGs at ``step``, each tagged by its index; the prompts as a text entry."""
        w = self._writer(concept_id)
        for i, path in enumerate(images):
            pixels = np.asarray(Image.open(path).convert("RGB"))
            w.add_image(f"stage{stage}/validation/{i:02d}", pixels, step, dataformats="HWC")
        if prompts:
            w.add_text(f"stage{stage}/validation/prompts", "\n\n".join(f"{i:02d}: {p}" for i, p in enumerate(prompts)),
                       step)
        w.flush()

    def close(self) -> None:
        """Flush and close every writer (event files are complete afterwards)."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()
