"""Tests for the packaged sample concepts (purecc.testbed.samples)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from purecc.testbed.samples import (
    CONCEPT_OBJECTS, DEMO_CONCEPTS, MANIFEST_COLUMNS, PACKAGED_SAMPLES_DIR, PLACEHOLDER, SAMPLE_CONCEPTS,
    check_packaged_samples, compare_sample_trees, concept_rows, deterministic_png_bytes, main,
    write_sample_concepts,
)
from purecc.testbed.world import BACKGROUNDS, world_batch


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("samples")
    return root, write_sample_concepts(root)


def _read_manifest(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_sample_concept_table() -> None:
    ids = [c.concept_id for c in SAMPLE_CONCEPTS]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert len({c.trigger_word for c in SAMPLE_CONCEPTS}) == 5
    assert DEMO_CONCEPTS == SAMPLE_CONCEPTS[:3]
    for concept_id, trigger, class_word in SAMPLE_CONCEPTS:
        assert re.fullmatch(r"[a-z]{2,5}", trigger), trigger
        assert CONCEPT_OBJECTS[concept_id].shape == class_word
    # Each concept's look is its own: no two share their shape, nor their colour.
    looks = [CONCEPT_OBJECTS[i].look for i in ids]
    assert len({shape for shape, _, _ in looks}) == len({color for _, color, _ in looks}) == 5


def test_each_concept_has_images_and_manifest(generated) -> None:
    root, manifests = generated
    assert set(manifests) == {c.concept_id for c in SAMPLE_CONCEPTS}
    for concept in SAMPLE_CONCEPTS:
        manifest = manifests[concept.concept_id]
        assert manifest == root / concept.concept_id / "manifest.csv"
        columns, rows = _read_manifest(manifest)
        assert tuple(columns) == MANIFEST_COLUMNS
        assert 4 <= len(rows) <= 5
        images = sorted((manifest.parent / "imgs").iterdir())
        assert len(images) == len(rows)
        for row in rows:
            path = Path(row["image_path"])
            assert not path.is_absolute() and path.suffix == ".png"
            file = manifest.parent / path
            assert 1_000 < file.stat().st_size < 16_000
            with Image.open(file) as im:
                assert im.format == "PNG" and im.size == (64, 64)


def test_manifest_placeholder_rules(generated) -> None:
    _, manifests = generated
    for concept in SAMPLE_CONCEPTS:
        _, rows = _read_manifest(manifests[concept.concept_id])
        for row in rows:
            assert row["prompt"].count(PLACEHOLDER) == 1
            assert PLACEHOLDER not in row["base_prompt"]
            assert row["base_prompt"] == row["prompt"].replace(f"{PLACEHOLDER} ", "")
            assert row["target_prompt"] == f"{PLACEHOLDER} {concept.class_word}"
            assert row["instance_word"] == concept.class_word
            assert f"{PLACEHOLDER} {concept.class_word}" in row["prompt"]
            assert any(f"on a {bg} background" in row["prompt"] for bg in BACKGROUNDS)
        # Different views: no two images share a caption.
        assert len({r["prompt"] for r in rows}) == len(rows)


def test_manifest_is_properly_quoted(generated) -> None:
    _, manifests = generated
    text = manifests[SAMPLE_CONCEPTS[0].concept_id].read_text(encoding="utf-8")
    assert text.splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    assert "\r" not in text
    rows = list(csv.reader(io.StringIO(text)))
    assert all(len(r) == len(MANIFEST_COLUMNS) for r in rows)  # commas in prompts quoted


def test_images_decode_to_the_rendered_pixels(generated) -> None:
    root, _ = generated
    concept = SAMPLE_CONCEPTS[1]
    for image, row in concept_rows(concept):
        with Image.open(root / concept.concept_id / row["image_path"]) as im:
            decoded = np.asarray(im.convert("RGB"))
        assert np.array_equal(decoded, np.asarray(image))


def test_reference_images_differ_from_each_other(generated) -> None:
    root, _ = generated
    for concept in SAMPLE_CONCEPTS:
        blobs = [p.read_bytes() for p in (root / concept.concept_id / "imgs").iterdir()]
        assert len(set(blobs)) == len(blobs)


def test_deterministic_png_bytes_roundtrip_rgb_and_indexed() -> None:
    few = world_batch(0, 1)[0][0]
    rng = np.random.default_rng(0)
    many = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB")
    for image in (few, many):
        data = deterministic_png_bytes(image)
        assert data == deterministic_png_bytes(image.copy())
        with Image.open(io.BytesIO(data)) as decoded:
            assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image))


def test_regenerated_samples_match_packaged_copies(generated) -> None:
    root, _ = generated
    assert PACKAGED_SAMPLES_DIR.is_dir()
    stale = compare_sample_trees(root, PACKAGED_SAMPLES_DIR)
    assert stale == [], f"run `python -m purecc.testbed.samples` to refresh: {stale}"


def test_check_detects_a_stale_file(generated, tmp_path: Path) -> None:
    root, _ = generated
    assert check_packaged_samples(root) == []
    copy = tmp_path / "copy"
    write_sample_concepts(copy)
    (copy / SAMPLE_CONCEPTS[0].concept_id / "imgs" / "00.png").write_bytes(b"x")
    (copy / "extra.txt").write_text("x")
    expected = sorted([f"{SAMPLE_CONCEPTS[0].concept_id}/imgs/00.png", "extra.txt"])
    assert check_packaged_samples(copy) == expected
    assert main(["--check", str(copy)]) == 1
    assert main(["--check", str(root)]) == 0


def test_held_out_prompts_put_each_concept_in_new_contexts() -> None:
    from purecc.testbed.facts import caption_facts, concept_positions
    from purecc.testbed.samples import HELD_OUT_KINDS, held_out_prompts
    for concept in SAMPLE_CONCEPTS:
        prompts = held_out_prompts(concept, 12)
        assert prompts == held_out_prompts(concept, 12)              # deterministic
        assert [p.kind for p in prompts] == list(HELD_OUT_KINDS) * 4
        references = {row["prompt"].replace(PLACEHOLDER, concept.trigger_word) for _, row in concept_rows(concept)}
        assert len({p.prompt for p in prompts}) == 12 and not references & {p.prompt for p in prompts}
        for p in prompts:
            assert concept_positions(p.prompt, concept.trigger_word) == [p.position]
            assert p.base_prompt == p.prompt.replace(f"{concept.trigger_word} ", "")
            facts = caption_facts(p.prompt)
            assert facts[f"{p.position}.shape"] == concept.class_word
            others = {k.split(".")[0] for k in facts if "." in k} - {p.position}
            assert len(others) == (0 if p.kind == "view" else 1), p
            for pos in others:   # the second object is ordinary: never a concept's look
                look = tuple(facts[f"{pos}.{a}"] for a in ("shape", "color", "pattern"))
                assert look[0] != concept.class_word and look not in {o.look for o in CONCEPT_OBJECTS.values()}
    with pytest.raises(ValueError, match="n=-1"):
        held_out_prompts(SAMPLE_CONCEPTS[0], -1)
