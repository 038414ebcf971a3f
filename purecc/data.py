"""Concept data: manifests (CSV or Parquet), image checks, preprocessing and cached latents.

A manifest has one row per reference image with the columns ``COLUMNS`` (README). The ``[v]`` placeholder
is replaced by the concept's trigger word in every prompt column. Every problem is reported as a
``ManifestError`` naming the file, the row (1-based data row) and the column.
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .fileio import atomic_save_tensors, load_tensors
from .model import module_fingerprint

PLACEHOLDER = "[v]"
COLUMNS = ("image_path", "prompt", "base_prompt", "target_prompt", "instance_word")
NEEDS_PLACEHOLDER = ("prompt", "target_prompt")
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP"})
MAX_IMAGE_PIXELS = 40_000_000      # decompression-bomb cap, checked on the header before decoding
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_ROWS = 1000
LATENT_CACHE_BYTES = 2 * 1024 ** 3  # cached latents kept per cache folder (least recently used go first)


class ManifestError(ValueError):
    """Bad concept data; the message names the file, row and column."""


@dataclass(frozen=True)
class ConceptRow:
    """One reference image and its prompts, with ``[v]`` already replaced by the trigger."""

    image_path: Path
    prompt: str
    base_prompt: str
    target_prompt: str
    instance_word: str
    # ``target_prompt`` without the placeholder: what the extractor's R is taken against when a stage-2
    # recipe asks for ``r_reference: class`` (derived, so the content hash does not need it)
    class_prompt: str = ""


@dataclass(frozen=True)
class ConceptManifest:
    """A checked concept manifest: its file, trigger word and rows."""

    path: Path
    trigger: str
    rows: tuple[ConceptRow, ...]

    def content_hash(self) -> str:
        """Hash of the prompts and image bytes: equal manifests train identical concepts."""
        h = hashlib.sha256(self.trigger.encode())
        for r in self.rows:
            h.update("\x00".join((r.prompt, r.base_prompt, r.target_prompt, r.instance_word)).encode())
            h.update(hashlib.sha256(r.image_path.read_bytes()).digest())
        return h.hexdigest()


@dataclass(frozen=True)
class Preprocess:
    """The seed's preprocessing: short side to ``resolution`` (Lanczos), square crop, optional flip."""

    resolution: int = 512
    crop: str = "center"          # "center" or "random"
    flip_prob: float = 0.0        # probability of a horizontal flip, drawn once per image
    max_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"resolution: {self.resolution} must be a multiple of 16 and >= 16")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop: {self.crop!r} must be 'center' or 'random'")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob: {self.flip_prob} must be within [0, 1]")


def _read_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                names = next(csv.reader(f), [])
            types = {n: pa.string() for n in names}  # never let Arrow turn a word into a number
            return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types=types, strings_can_be_null=False))
        if suffix == ".parquet":
            return pq.read_table(path)
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot be parsed as {suffix[1:]} ({exc})") from exc
    raise ManifestError(f"{path}: unsupported manifest format {suffix!r} (expected .csv or .parquet)")


def check_image(path: Path, *, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse missing, unreadable, oversized or unsupported images without decoding the pixels."""
    if not path.is_file():
        raise ManifestError(f"{where}: image {path} does not exist")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ManifestError(f"{where}: image {path} is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        with Image.open(path) as img:
            fmt, (w, h) = img.format, img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ManifestError(f"{where}: image {path} is unreadable ({exc})") from exc
    if fmt not in IMAGE_FORMATS:
        raise ManifestError(f"{where}: image {path} has unsupported format {fmt} "
                            f"(expected one of {sorted(IMAGE_FORMATS)})")
    if w * h > max_pixels:
        raise ManifestError(f"{where}: image {path} is too large ({w}x{h} = {w * h} pixels > "
                            f"{max_pixels}; refusing a possible decompression bomb)")


def read_concept_manifest(path: str | Path, trigger: str, *, max_pixels: int = MAX_IMAGE_PIXELS) -> ConceptManifest:
    """Parse and check a concept manifest; substitute ``[v]`` with ``trigger`` in every prompt column."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file does not exist")
    table = _read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing} (expected columns {list(COLUMNS)})")
    if table.num_rows == 0:
        raise ManifestError(f"{path}: manifest is empty (no image rows)")
    if table.num_rows > MAX_ROWS:
        raise ManifestError(f"{path}: {table.num_rows} rows exceed the limit of {MAX_ROWS}")
    data = {c: table.column(c).to_pylist() for c in COLUMNS}
    rows = [_parse_row(path, i, {c: data[c][i] for c in COLUMNS}, trigger, max_pixels)
            for i in range(table.num_rows)]
    return ConceptManifest(path=path, trigger=trigger, rows=tuple(rows))


def _parse_row(path: Path, i: int, raw: dict, trigger: str, max_pixels: int) -> ConceptRow:
    def where(col: str) -> str:
        return f"{path}: row {i + 1}, column {col!r}"

    for col in COLUMNS:
        if raw[col] is None or not str(raw[col]).strip():
            raise ManifestError(f"{where(col)}: value is empty")
    for col in NEEDS_PLACEHOLDER:
        if PLACEHOLDER not in raw[col]:
            raise ManifestError(f"{where(col)}: prompt {raw[col]!r} lacks the placeholder {PLACEHOLDER}")
    if PLACEHOLDER in raw["base_prompt"]:
        raise ManifestError(f"{where('base_prompt')}: must not contain the placeholder {PLACEHOLDER}")
    image = _image_path(path, raw["image_path"])
    check_image(image, where=where("image_path"), max_pixels=max_pixels)
    def sub(text: str) -> str:
        return text.replace(PLACEHOLDER, trigger)

    return ConceptRow(image_path=image, prompt=sub(raw["prompt"]), base_prompt=sub(raw["base_prompt"]),
                      target_prompt=sub(raw["target_prompt"]), instance_word=sub(raw["instance_word"]),
                      class_prompt=" ".join(raw["target_prompt"].replace(PLACEHOLDER, " ").split()))


def _image_path(manifest: Path, value: str) -> Path:
    image = Path(value)
    return image if image.is_absolute() else manifest.parent / image


def manifest_image_paths(path: str | Path) -> list[Path]:
    """The image paths a manifest names, resolved as ``read_concept_manifest`` does, without opening any
    image (to check where they point before reading them). Raises ``ManifestError``."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file does not exist")
    table = _read_table(path)
    if "image_path" not in table.column_names:
        raise ManifestError(f"{path}: missing column 'image_path'")
    return [_image_path(path, str(v or "")) for v in table.column("image_path").to_pylist()]


def load_image(path: Path) -> Image.Image:
    """Decode an image as RGB, rotated upright by its EXIF orientation."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def preprocess(img: Image.Image, cfg: Preprocess, rng: random.Random) -> torch.Tensor:
    """PIL image -> float tensor (3, R, R) in [-1, 1]."""
    w, h = img.size
    scale = cfg.resolution / min(w, h)
    nw, nh = max(cfg.resolution, round(w * scale)), max(cfg.resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    if cfg.crop == "random":
        left, top = rng.randint(0, nw - cfg.resolution), rng.randint(0, nh - cfg.resolution)
    else:
        left, top = (nw - cfg.resolution) // 2, (nh - cfg.resolution) // 2
    img = img.crop((left, top, left + cfg.resolution, top + cfg.resolution))
    if rng.random() < cfg.flip_prob:
        img = ImageOps.mirror(img)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class LatentMoments(NamedTuple):
    """The VAE posterior of every image, in the transformer's (shifted, scaled) latent space."""

    mean: torch.Tensor        # (N, 16, H/8, W/8)
    std: torch.Tensor         # (N, 16, H/8, W/8)


@torch.no_grad()
def encode_latent_moments(vae, pixels: torch.Tensor, batch_size: int = 8) -> LatentMoments:
    """(N, 3, H, W) in [-1, 1] -> the posterior's scaled mean and std, each (N, 16, H/8, W/8)."""
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    p = next(vae.parameters())
    means, stds = [], []
    for chunk in pixels.split(batch_size):
        dist = vae.encode(chunk.to(p.device, p.dtype)).latent_dist
        means.append(((dist.mean - shift) * scale).float().cpu())
        stds.append((dist.std * scale).float().cpu())
    return LatentMoments(torch.cat(means), torch.cat(stds))


def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 16, H/8, W/8) scaled latents, using the posterior mean."""
    return encode_latent_moments(vae, pixels, batch_size).mean


def concept_latents(manifest: ConceptManifest, vae, cfg: Preprocess, *, seed: int = 0,
                    cache_dir: str | Path | None = None) -> torch.Tensor:
    """Posterior-mean latents of every row (N, 16, h, w); see ``concept_latent_moments``."""
    return concept_latent_moments(manifest, vae, cfg, seed=seed, cache_dir=cache_dir).mean


def concept_latent_moments(manifest: ConceptManifest, vae, cfg: Preprocess, *, seed: int = 0,
                           cache_dir: str | Path | None = None) -> LatentMoments:
    """The VAE posterior of every row, encoded once; with ``cache_dir`` also cached as safetensors.

    Random crops and flips are drawn once per image from ``seed`` (as the stock DreamBooth recipe
    does), so the cached latents are exactly what training sees. The cache is keyed by what produced
    the latents: the preprocessing, the seed, the image bytes and the VAE itself (its fingerprint).
    """
    key = hashlib.sha256(repr((cfg, seed, module_fingerprint(vae))).encode())
    for r in manifest.rows:
        key.update(hashlib.sha256(r.image_path.read_bytes()).digest())
    cache = Path(cache_dir) / f"{key.hexdigest()[:32]}.safetensors" if cache_dir else None
    if cache is not None and cache.is_file():
        stored = load_tensors(cache)
        if "mean" in stored and "std" in stored:
            os.utime(cache)                 # recently used: pruned last
            return LatentMoments(stored["mean"], stored["std"])
    rng = random.Random(seed)
    pixels = torch.stack([preprocess(load_image(r.image_path), cfg, rng) for r in manifest.rows])
    moments = encode_latent_moments(vae, pixels)
    if cache is not None:
        atomic_save_tensors(cache, {"mean": moments.mean, "std": moments.std})
        prune_latent_cache(cache.parent, keep=cache)
    return moments


def prune_latent_cache(cache_dir: str | Path, *, max_bytes: int = LATENT_CACHE_BYTES,
                       keep: Path | None = None) -> list[Path]:
    """Delete the least recently used cached latents until the folder holds at most ``max_bytes``
    (``keep`` is never deleted); returns what was deleted."""
    files = sorted(Path(cache_dir).glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    total, removed = sum(p.stat().st_size for p in files), []
    for p in files:
        if total <= max_bytes:
            break
        if p == keep:
            continue
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
