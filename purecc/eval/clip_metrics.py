"""The paper's real-world metrics, for users who have the weights in local folders.

- CLIP-T: ``100 * cos(image, prompt)`` in CLIP space (the scale of the paper's ~22 figures).
- CLIP-I: ``cos(image, reference)`` in CLIP image space, averaged over the reference images.
- DINO: ``cos`` of DINOv2 CLS embeddings (``pooler_output``), averaged over the references.

Models load with ``from_pretrained(folder, local_files_only=True)``; nothing is downloaded.
Any CLIP folder (``CLIPModel`` + its processor) and any DINOv2 folder (``Dinov2Model`` + its
image processor) work; without torchvision transformers uses the PIL image processors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..offline import force_offline


def _pooled(out) -> torch.Tensor:
    """Projected features from ``get_*_features``: a tensor (transformers 4) or an output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im.convert("RGB") for im in images]


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N,) mean over rows of ``b`` of the cosine with each row of ``a``; both (., D) unit-norm."""
    return (a @ b.t()).mean(1).numpy()


class ClipScorer:
    """CLIP-T and CLIP-I from a local ``CLIPModel`` folder."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        force_offline()
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm image embeddings."""
        pixels = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device))
        return F.normalize(_pooled(out).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings (prompts truncated to the model's context)."""
        tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(_pooled(out).float(), dim=-1).cpu()

    def clip_t(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """(N,) 100 x cosine between each image and its prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"prompts: {len(prompts)} given for {len(images)} images")
        return 100.0 * (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1).numpy()

    def clip_i(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> np.ndarray:
        """(N,) mean cosine between each image and the reference images."""
        return _mean_cosine(self.image_embeds(images), self.image_embeds(references))


class DinoScorer:
    """DINO similarity from a local ``Dinov2Model`` folder."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        force_offline()
        from transformers import AutoImageProcessor, Dinov2Model

        self.device = torch.device(device)
        self.model = Dinov2Model.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) unit-norm CLS embeddings."""
        pixels = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(self.device))
        return F.normalize(out.pooler_output.float(), dim=-1).cpu()

    def dino(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> np.ndarray:
        """(N,) mean cosine between each image and the reference images."""
        return _mean_cosine(self.image_embeds(images), self.image_embeds(references))
