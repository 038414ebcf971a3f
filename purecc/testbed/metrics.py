"""Toy-world metrics of a customised model, read by the world reader.

- ``text_alignment``: the share of the facts a prompt asks for that the reader sees.
- ``concept_fidelity``: cosine of the concept's object embedding to its reference objects'.
- ``preservation_same_seed``: the same seed drawn by the base on ``base_prompt`` and by the
  customised model on ``prompt``: how much outside the concept stays the same (facts and pixels).
- ``drift_unrelated``: prompts without the trigger, base vs customised model: alignment, the
  distribution of what is drawn, and same-seed agreement.
- ``concept_identity``: whether the reader sees the concept's defining look (shape, colour and
  pattern together) where the concept should stand.
- ``paired_interval``: the mean per-seed difference of two methods with its 95% interval.

Images are PIL images of the world's 64 px size; per-image scores are numpy arrays, so a
caller can average over prompts and report the spread over seeds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..data import load_image, read_concept_manifest
from .world import SIZES, WorldObject, object_box
from .facts import ATTRIBUTES, caption_facts, concept_positions
from .reader import WorldReader, object_embeddings, read_facts

CONTEXT_MARGIN_PX = 3  # concept images are jittered by up to a reference pixel


def fact_recall(seen: dict[str, str], asked: dict[str, str]) -> float:
    """Share of ``asked`` facts that ``seen`` has with the same value."""
    if not asked:
        raise ValueError("asked: a prompt with no facts cannot be scored")
    return sum(seen.get(k) == v for k, v in asked.items()) / len(asked)


def text_alignment(reader: WorldReader, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
    """(N,) share of each prompt's facts (``facts.caption_facts``) the reader sees in its image."""
    if len(images) != len(prompts):
        raise ValueError(f"prompts: {len(prompts)} given for {len(images)} images")
    seen = read_facts(reader, images)
    return np.array([fact_recall(s, caption_facts(p)) for s, p in zip(seen, prompts)])


def concept_references(manifest: str | Path, trigger: str = "[v]") -> tuple[list[Image.Image], list[str]]:
    """A concept's reference images and where its object stands in each (from the prompts)."""
    rows = read_concept_manifest(manifest, trigger).rows
    positions = []
    for row in rows:
        found = concept_positions(row.prompt, trigger)
        if len(found) != 1:
            raise ValueError(f"{manifest}: prompt {row.prompt!r} names the concept {len(found)} times")
        positions.append(found[0])
    return [load_image(r.image_path) for r in rows], positions


def concept_fidelity(reader: WorldReader, images: Sequence[Image.Image], positions: Sequence[str],
                     references: Sequence[Image.Image], ref_positions: Sequence[str]) -> np.ndarray:
    """(N,) mean cosine between the object at ``positions[b]`` of image b and each reference object."""
    emb = object_embeddings(reader, images, positions)             # (N, E)
    ref = object_embeddings(reader, references, ref_positions)     # (R, E)
    return (emb @ ref.t()).mean(1).numpy()


def concept_identity(reader: WorldReader, images: Sequence[Image.Image], positions: Sequence[str],
                     look: tuple[str, str, str]) -> np.ndarray:
    """(N,) bool: the reader reads ``look`` = (shape, color, pattern) at ``positions[b]`` of image b."""
    if len(images) != len(positions):
        raise ValueError(f"positions: {len(positions)} given for {len(images)} images")
    seen = read_facts(reader, images)
    return np.array([all(s.get(f"{pos}.{attr}") == value for attr, value in zip(("shape", "color", "pattern"), look))
                     for s, pos in zip(seen, positions)])


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (scipy is not a dependency;
# these are the textbook values to three decimals); beyond 30 the normal 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def paired_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of the per-seed differences ``a[i] - b[i]`` and its 95% t interval (lo, hi).

    With one seed the interval is (-inf, inf): a single pair says nothing about the spread.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0 or len(a) != len(b):
        raise ValueError(f"a, b: need two equally long, non-empty sequences, got {len(a)} and {len(b)}")
    mean = float(d.mean())
    if len(d) == 1:
        return mean, float("-inf"), float("inf")
    df = len(d) - 1
    half = (_T975[df - 1] if df <= len(_T975) else 1.96) * float(d.std(ddof=1)) / np.sqrt(len(d))
    return mean, mean - half, mean + half


def _context_mask(positions: Sequence[str], size: int) -> np.ndarray:
    """(H, W) bool: pixels away from the (large) concept objects at ``positions``."""
    keep = np.ones((size, size), dtype=bool)
    for pos in positions:
        x0, y0, x1, y1 = object_box(WorldObject("circle", "red", size=SIZES[-1], position=pos), size)
        m = CONTEXT_MARGIN_PX
        keep[max(0, y0 - m):y1 + m, max(0, x0 - m):x1 + m] = False
    return keep


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two arrays in [0, 1] (inf when equal)."""
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def _agreement(a: dict[str, str], b: dict[str, str], skip: Sequence[str] = ()) -> float:
    """Share of the keys of either read-out (outside the positions ``skip``) on which they agree."""
    keys = [k for k in a.keys() | b.keys() if k.split(".")[0] not in skip]
    return sum(a.get(k) == b.get(k) for k in keys) / len(keys)


def preservation_same_seed(reader: WorldReader, base_images: Sequence[Image.Image],
                           custom_images: Sequence[Image.Image],
                           concept_at: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Same seed, base model on ``base_prompt`` vs customised model on ``prompt``.

    ``concept_at[b]``: the positions of the concept object(s) in pair b. Returns per pair
    ``context_agreement`` (the reader's facts outside those positions, background included, that
    are equal in both images; 1 = nothing else changed) and ``context_psnr`` (dB, pixels outside
    the concept boxes).
    """
    if not len(base_images) == len(custom_images) == len(concept_at):
        raise ValueError("base_images, custom_images and concept_at must have the same length")
    seen_base, seen_custom = read_facts(reader, base_images), read_facts(reader, custom_images)
    agree, quality = [], []
    for a, b, img_a, img_b, at in zip(seen_base, seen_custom, base_images, custom_images, concept_at):
        agree.append(_agreement(a, b, skip=at))
        keep = _context_mask(at, img_a.size[0])
        quality.append(psnr(_pixels(img_a)[keep], _pixels(img_b)[keep]))
    return {"context_agreement": np.array(agree), "context_psnr": np.array(quality)}


def _distribution(facts: Sequence[dict[str, str]], kind: str) -> Counter:
    if kind == "background":
        return Counter(f["background"] for f in facts)
    if kind == "objects":
        return Counter(sum(k.endswith(".shape") for k in f) for f in facts)
    return Counter(v for f in facts for k, v in f.items() if k.endswith("." + kind))


def total_variation(p: Counter, q: Counter) -> float:
    """0.5 * sum |p - q| of two normalised histograms (0 when both are empty)."""
    np_, nq = sum(p.values()), sum(q.values())
    if not np_ and not nq:
        return 0.0
    if not np_ or not nq:
        return 1.0
    return 0.5 * sum(abs(p[k] / np_ - q[k] / nq) for k in p.keys() | q.keys())


def drift_unrelated(reader: WorldReader, base_images: Sequence[Image.Image],
                    custom_images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """Prompts without the trigger, drawn with the same seeds by the base and the customised model.

    ``alignment_base`` / ``alignment_custom`` and their difference ``alignment_delta`` (custom
    minus base; 0 = no loss); ``attribute_tv``: mean total-variation distance between the two
    models' distributions of background, object count and each attribute (0 = same); and
    ``same_seed_agreement``: the share of read facts equal in each same-seed pair (1 = unchanged).
    """
    if not len(base_images) == len(custom_images) == len(prompts):
        raise ValueError("base_images, custom_images and prompts must have the same length")
    seen_base, seen_custom = read_facts(reader, base_images), read_facts(reader, custom_images)
    asked = [caption_facts(p) for p in prompts]
    align_b = np.mean([fact_recall(s, a) for s, a in zip(seen_base, asked)])
    align_c = np.mean([fact_recall(s, a) for s, a in zip(seen_custom, asked)])
    kinds = ("background", "objects", *ATTRIBUTES)
    tv = np.mean([total_variation(_distribution(seen_base, k), _distribution(seen_custom, k)) for k in kinds])
    agree = np.mean([_agreement(a, b) for a, b in zip(seen_base, seen_custom)])
    return {"alignment_base": float(align_b), "alignment_custom": float(align_c),
            "alignment_delta": float(align_c - align_b), "attribute_tv": float(tv),
            "same_seed_agreement": float(agree)}


__all__ = ["text_alignment", "concept_fidelity", "concept_identity", "paired_interval", "concept_references", "preservation_same_seed",
           "drift_unrelated", "fact_recall", "total_variation", "psnr"]
