"""Five sample concepts drawn from the toy world (`purecc.testbed.world`), ready to train on.

Each concept is an ordinary world shape (its class word) in a colour and pattern the world base
knows but never saw bound to that shape (`world.CONCEPT_LOOKS`), shown on five different
backgrounds and positions. The first three are the demo's; all five are the testbed's. The
generated copies live in the package folder `purecc/testbed/assets/samples/<concept_id>/`
(`manifest.csv` + `imgs/NN.png`); `check_packaged_samples()` regenerates them and lists
any file that is no longer byte-identical.

PNGs are written by a small encoder of our own (indexed colour, stored deflate blocks),
so the bytes depend only on the pixels, never on the zlib or Pillow version.

    python -m purecc.testbed.samples            # rewrite purecc/testbed/assets/samples/
    python -m purecc.testbed.samples --check    # exit 1 if the packaged copies are stale
"""

from __future__ import annotations

import csv
import random
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image

from .world import (
    BACKGROUNDS, CONCEPT_LOOKS, PATTERNS, POSITION_PHRASES, POSITIONS, RELATION_POSITIONS, RELATIONS,
    SHAPES, SIZES, ConceptObject, WorldObject, concept_caption, render_concept_scene, usable_colors,
)

PLACEHOLDER = "[v]"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_path", "prompt", "base_prompt", "target_prompt", "instance_word",
)
IMAGES_PER_CONCEPT = 5
PACKAGED_SAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "samples"


class SampleConcept(NamedTuple):
    """One sample concept: its id (folder name), trigger word and class word."""

    concept_id: str
    trigger_word: str
    class_word: str


SAMPLE_CONCEPTS: tuple[SampleConcept, ...] = (
    SampleConcept("checkered-star", "zqx", "star"),
    SampleConcept("striped-circle", "vlk", "circle"),
    SampleConcept("dotted-diamond", "bxj", "diamond"),
    SampleConcept("dotted-square", "wfp", "square"),
    SampleConcept("checkered-triangle", "kdy", "triangle"),
)
DEMO_CONCEPTS: tuple[SampleConcept, ...] = SAMPLE_CONCEPTS[:3]

# Each look is one of world.CONCEPT_LOOKS: never drawn by ordinary scenes.
CONCEPT_OBJECTS: Mapping[str, ConceptObject] = MappingProxyType({
    "checkered-star": ConceptObject("checkered-star", "star", "orange", "checkered"),
    "striped-circle": ConceptObject("striped-circle", "circle", "green", "striped"),
    "dotted-diamond": ConceptObject("dotted-diamond", "diamond", "purple", "dotted"),
    "dotted-square": ConceptObject("dotted-square", "square", "red", "dotted"),
    "checkered-triangle": ConceptObject("checkered-triangle", "triangle", "yellow", "checkered"),
})


# ---------------------------------------------------------------- deterministic PNG

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def _stored_zlib(data: bytes) -> bytes:
    """A zlib stream of uncompressed deflate blocks: the same bytes under any zlib."""
    out = [b"\x78\x01"]
    starts = range(0, len(data), 0xFFFF) if data else [0]
    for start in starts:
        block = data[start:start + 0xFFFF]
        final = int(start + 0xFFFF >= len(data))
        out.append(struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF) + block)
    out.append(struct.pack(">I", zlib.adler32(data) & 0xFFFFFFFF))
    return b"".join(out)


def deterministic_png_bytes(image: Image.Image) -> bytes:
    """Encode `image` as PNG bytes that depend only on its RGB pixels. Images with at most
    256 colours are written indexed (mode 'P' when read back), others as 8-bit RGB."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    h, w, _ = rgb.shape
    palette, index = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    chunks = []
    if len(palette) <= 256:
        rows = index.reshape(h, w).astype(np.uint8)
        header = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)
        chunks.append(_png_chunk(b"PLTE", palette.astype(np.uint8).tobytes()))
    else:
        rows = rgb.reshape(h, w * 3)
        header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    # Filter type 0 (none) in front of every row.
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    return b"".join([
        b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header), *chunks,
        _png_chunk(b"IDAT", _stored_zlib(raw)), _png_chunk(b"IEND", b""),
    ])


# ---------------------------------------------------------------- concept data

def concept_views(concept: SampleConcept, n: int = IMAGES_PER_CONCEPT) -> list[tuple[str, str]]:
    """The deterministic (background, position) pairs of a sample concept's images."""
    if not 1 <= n <= len(POSITIONS):
        raise ValueError(f"n={n} must be in 1..{len(POSITIONS)}")
    rng = random.Random(f"purecc-sample/{concept.concept_id}")
    backgrounds = rng.sample(BACKGROUNDS, n)
    positions = rng.sample(POSITIONS, n)
    return list(zip(backgrounds, positions))


class HeldOutPrompt(NamedTuple):
    """A prompt that puts a concept somewhere its references never show it."""

    prompt: str          # with the trigger
    base_prompt: str     # the same without the trigger (what the base model draws for it)
    position: str        # where the concept stands
    kind: str            # "view": a background/position pair no reference has;
                         # "pair": a second, ordinary object beside it; "relation": "above" etc.


HELD_OUT_KINDS: tuple[str, ...] = ("view", "pair", "relation")


def _other_object(rng: random.Random, concept: SampleConcept, background: str, position: str) -> WorldObject:
    """An ordinary object of another shape, visible on ``background``, never a concept's look."""
    while True:
        obj = WorldObject(rng.choice([s for s in SHAPES if s != concept.class_word]),
                          rng.choice(usable_colors(background)), rng.choice(PATTERNS), rng.choice(SIZES), position)
        if (obj.shape, obj.color, obj.pattern) not in CONCEPT_LOOKS:
            return obj


def held_out_prompts(concept: SampleConcept, n: int, trigger: str | None = None) -> list[HeldOutPrompt]:
    """``n`` deterministic prompts for ``concept`` in new contexts, the kinds in turn (view, pair,
    relation, view, ...); ``trigger`` defaults to the concept's trigger word."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    trigger = concept.trigger_word if trigger is None else trigger
    rng = random.Random(f"purecc-held-out/{concept.concept_id}")
    seen = set(concept_views(concept))
    views = [(bg, pos) for bg in BACKGROUNDS for pos in POSITIONS if (bg, pos) not in seen]
    rng.shuffle(views)
    subject = f"a {trigger} {concept.class_word}"
    base_subject = f"a {concept.class_word}"
    out = []
    for i in range(n):
        kind = HELD_OUT_KINDS[i % len(HELD_OUT_KINDS)]
        if kind == "view":
            bg, pos = views[(i // len(HELD_OUT_KINDS)) % len(views)]
            obj = CONCEPT_OBJECTS[concept.concept_id]
            out.append(HeldOutPrompt(concept_caption(obj, bg, pos, trigger), concept_caption(obj, bg, pos, ""),
                                     pos, kind))
            continue
        bg = rng.choice(BACKGROUNDS)
        if kind == "pair":
            pos, other_pos = rng.choice((("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")))
            other = _other_object(rng, concept, bg, other_pos)
            tail = f" {POSITION_PHRASES[pos]} and a {other.phrase()} {POSITION_PHRASES[other_pos]}, on a {bg} background"
        else:
            relation = rng.choice(RELATIONS)
            pos, other_pos = RELATION_POSITIONS[relation]
            other = _other_object(rng, concept, bg, other_pos)
            tail = f" {relation} a {other.phrase()}, on a {bg} background"
        out.append(HeldOutPrompt(subject + tail, base_subject + tail, pos, kind))
    return out


def concept_rows(concept: SampleConcept, size: int = 64
                 ) -> list[tuple[Image.Image, dict[str, str]]]:
    """(image, manifest row) for each reference image of `concept`."""
    obj = CONCEPT_OBJECTS[concept.concept_id]
    if obj.shape != concept.class_word:
        raise ValueError(f"{concept.concept_id}: class_word={concept.class_word!r} "
                         f"but the object is a {obj.shape!r}")
    jitter = random.Random(f"purecc-sample-jitter/{concept.concept_id}")
    out = []
    for i, (background, position) in enumerate(concept_views(concept)):
        image = render_concept_scene(obj, background, position, size, jitter)
        row = {
            "image_path": f"imgs/{i:02d}.png",
            "prompt": concept_caption(obj, background, position, PLACEHOLDER),
            "base_prompt": concept_caption(obj, background, position, ""),
            "target_prompt": f"{PLACEHOLDER} {concept.class_word}",
            "instance_word": concept.class_word,
        }
        out.append((image, row))
    return out


def write_concept(concept: SampleConcept, dest_dir: str | Path, size: int = 64) -> Path:
    """Write one concept's images and manifest under `dest_dir/<concept_id>/`."""
    folder = Path(dest_dir) / concept.concept_id
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for image, row in concept_rows(concept, size):
        (folder / row["image_path"]).write_bytes(deterministic_png_bytes(image))
        rows.append(row)
    manifest = folder / "manifest.csv"
    with manifest.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n",
                                quoting=csv.QUOTE_MINIMAL)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def write_sample_concepts(dest_dir: str | Path, size: int = 64) -> dict[str, Path]:
    """Write every sample concept under `dest_dir`; returns concept id -> manifest path."""
    return {c.concept_id: write_concept(c, dest_dir, size) for c in SAMPLE_CONCEPTS}


def _tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def compare_sample_trees(expected: Path, actual: Path) -> list[str]:
    """Relative paths that differ between two sample trees: changed, missing or extra."""
    want, have = _tree_files(expected), _tree_files(actual)
    return sorted(path for path in want.keys() | have.keys()
                  if want.get(path) != have.get(path))


def check_packaged_samples(packaged_dir: str | Path = PACKAGED_SAMPLES_DIR) -> list[str]:
    """Regenerate the samples in a temporary folder and list the files of `packaged_dir`
    that are not byte-identical to them (empty when the packaged copies are current)."""
    with tempfile.TemporaryDirectory(prefix="purecc-samples-") as tmp:
        write_sample_concepts(tmp)
        return compare_sample_trees(Path(tmp), Path(packaged_dir))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `[--check] [DEST]`; writes the samples to DEST (default: the package folder),
    or with --check reports stale packaged files and returns 1 if there are any."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    rest = [a for a in args if a != "--check"]
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        print("usage: python -m purecc.testbed.samples [--check] [DEST]", file=sys.stderr)
        return 2
    dest = Path(rest[0]) if rest else PACKAGED_SAMPLES_DIR
    if check:
        stale = check_packaged_samples(dest)
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        return 1 if stale else 0
    for concept_id, manifest in write_sample_concepts(dest).items():
        print(f"{concept_id}: {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
