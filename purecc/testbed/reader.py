"""The world reader: a small CNN that reads a toy-world image back into facts and embeddings.

It is the project's stand-in for CLIP/DINO in the toy world. For each of the five positions it
says whether an object stands there and reads its shape, colour, pattern and size; it reads
the background from the whole image. Its per-position *object embedding* (the feature the
heads read from) is what concept fidelity compares, so a concept is compared with its
reference images object to object, wherever each one stands.

Architecture: a full-resolution stem (it sees 2 px stripes and dots), then three
stride-2/stride-1 conv stages to a (C, 8, 8) map; each position pools that map with a fixed
Gaussian window around the position's centre; a shared MLP turns the pooled vector into the
object embedding, shared heads read the attributes from it.
Weights: ``assets/world-metric/reader.safetensors`` + ``reader.json`` (config, vocabulary,
training report), trained by ``python -m purecc.testbed.train_reader``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..fileio import atomic_save_tensors, atomic_write_json, load_tensors, sha256_file
from .world import BACKGROUNDS, COLORS, PATTERNS, POSITION_CENTERS, POSITIONS, SHAPES, SIZES

WEIGHTS, CONFIG = "reader.safetensors", "reader.json"
PACKAGED_WORLD_METRIC = Path(__file__).resolve().parent / "assets" / "world-metric"
VOCAB: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLORS, "pattern": PATTERNS, "size": SIZES}


@dataclass(frozen=True)
class ReaderConfig:
    """Shapes of the reader; ``image_size`` is what images are resized to before reading."""

    channels: tuple[int, int, int, int] = (16, 32, 64, 96)
    embed_dim: int = 96
    pool_sigma: float = 1.0          # Gaussian window, in cells of the 8x8 map (8 px each)
    image_size: int = 64

    def __post_init__(self) -> None:
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise ValueError(f"channels: need 4 positive widths, got {self.channels}")
        if self.image_size != 64:
            raise ValueError(f"image_size: the reader works on 64 px images, got {self.image_size}")


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


def position_windows(grid: int, sigma: float) -> torch.Tensor:
    """(P, grid*grid) normalised Gaussian weights centred on each position of world.POSITIONS."""
    cells = torch.arange(grid, dtype=torch.float32) + 0.5
    rows = []
    for pos in POSITIONS:
        fx, fy = POSITION_CENTERS[pos]
        w = torch.exp(-((cells[None, :] - fx * grid) ** 2 + (cells[:, None] - fy * grid) ** 2)
                      / (2 * sigma ** 2))                       # (grid, grid): [y, x]
        rows.append((w / w.sum()).flatten())
    return torch.stack(rows)


class WorldReader(nn.Module):
    """The reader CNN: a conv trunk, Gaussian pooling per position, an embedding MLP and heads."""

    def __init__(self, cfg: ReaderConfig = ReaderConfig()):
        super().__init__()
        self.cfg = cfg
        c1, c2, c3, c4 = cfg.channels
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1), nn.SiLU(),          # 64x64, unnormalised: keeps contrast
            _conv(16, c1, 2), _conv(c1, c1, 1),            # 32x32
            _conv(c1, c2, 2), _conv(c2, c2, 1),           # 16x16
            _conv(c2, c3, 2), _conv(c3, c3, 1),           # 8x8
            _conv(c3, c4, 1), nn.Conv2d(c4, c4, 3, 1, 2, dilation=2))
        self.register_buffer("windows", position_windows(8, cfg.pool_sigma), persistent=False)
        self.embed = nn.Sequential(nn.Linear(c4, cfg.embed_dim), nn.SiLU(),
                                   nn.Linear(cfg.embed_dim, cfg.embed_dim))
        self.heads = nn.ModuleDict({"present": nn.Linear(cfg.embed_dim, 2),
                                    **{a: nn.Linear(cfg.embed_dim, len(v)) for a, v in VOCAB.items()}})
        self.background = nn.Linear(c4, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 64, 64) in [-1, 1]. Returns logits ``background`` (B, 7), per-position
        ``present``/attribute logits (B, P, K) and ``embedding`` (B, P, E)."""
        fmap = self.trunk(x)                                     # (B, C, 8, 8)
        flat = fmap.flatten(2)                                   # (B, C, 64)
        pooled = torch.einsum("bcn,pn->bpc", flat, self.windows)  # (B, P, C)
        emb = self.embed(pooled)                                 # (B, P, E)
        out = {name: head(F.silu(emb)) for name, head in self.heads.items()}
        out["background"] = self.background(flat.mean(2))
        out["embedding"] = emb
        return out


# ---------------------------------------------------------------- files

def world_metric_path() -> Path:
    """The packaged, trained world reader."""
    return PACKAGED_WORLD_METRIC


def save_reader(reader: WorldReader, folder: str | Path, report: dict | None = None) -> Path:
    """Write ``reader.safetensors`` and ``reader.json`` (config, vocabulary, sha256, report) to ``folder``."""
    folder = Path(folder)
    atomic_save_tensors(folder / WEIGHTS, reader.state_dict())
    atomic_write_json(folder / CONFIG, {"config": asdict(reader.cfg), "positions": list(POSITIONS),
                                        "backgrounds": list(BACKGROUNDS), "vocab": VOCAB,
                                        "weights_sha256": sha256_file(folder / WEIGHTS),
                                        "report": report or {}})
    return folder


def load_reader(folder: str | Path | None = None) -> WorldReader:
    """Load a reader (default: the packaged one); refuses weights that do not match their sha256."""
    folder = Path(folder) if folder is not None else world_metric_path()
    meta = json.loads((folder / CONFIG).read_text())
    if sha256_file(folder / WEIGHTS) != meta["weights_sha256"]:
        raise ValueError(f"world metric {folder}: {WEIGHTS} does not match its recorded sha256")
    cfg = meta["config"]
    reader = WorldReader(ReaderConfig(**{**cfg, "channels": tuple(cfg["channels"])}))
    reader.load_state_dict(load_tensors(folder / WEIGHTS))
    return reader.eval()


# ---------------------------------------------------------------- reading images

def images_to_tensor(images: Sequence[Image.Image], size: int = 64) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) float in [-1, 1] (resized with Lanczos if needed)."""
    arrays = []
    for img in images:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def run_reader(reader: WorldReader, images: Sequence[Image.Image], chunk: int = 128) -> dict[str, torch.Tensor]:
    """The reader's outputs for PIL images, concatenated over chunks."""
    x = images_to_tensor(images, reader.cfg.image_size)
    outs = [reader(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def outputs_to_facts(out: dict[str, torch.Tensor]) -> list[dict[str, str]]:
    """Read facts per image: the background, and the attributes at every position judged present."""
    facts = []
    present = out["present"].argmax(-1)                          # (B, P)
    idx = {a: out[a].argmax(-1) for a in VOCAB}                  # (B, P) each
    for b in range(present.shape[0]):
        f = {"background": BACKGROUNDS[int(out["background"][b].argmax())]}
        for p, pos in enumerate(POSITIONS):
            if present[b, p]:
                f.update({f"{pos}.{a}": VOCAB[a][int(idx[a][b, p])] for a in VOCAB})
        facts.append(f)
    return facts


def read_facts(reader: WorldReader, images: Sequence[Image.Image]) -> list[dict[str, str]]:
    """What the reader sees in each image, as facts (see ``purecc.testbed.facts.scene_facts``)."""
    return outputs_to_facts(run_reader(reader, images))


def object_embeddings(reader: WorldReader, images: Sequence[Image.Image],
                      positions: Sequence[str]) -> torch.Tensor:
    """(B, E) unit-norm object embedding of image b at ``positions[b]``."""
    if len(positions) != len(images):
        raise ValueError(f"positions: {len(positions)} given for {len(images)} images")
    emb = run_reader(reader, images)["embedding"]                # (B, P, E)
    rows = torch.tensor([POSITIONS.index(p) for p in positions])
    return F.normalize(emb[torch.arange(len(images)), rows], dim=-1)
