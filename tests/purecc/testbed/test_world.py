"""Tests for the procedural toy world (purecc.testbed.world)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from purecc.testbed.world import (
    BACKGROUNDS, COLOR_RGB, COLORS, CONCEPT_LOOKS, COUNTS, PATTERN_SHADES, PATTERNS,
    POSITION_PHRASES, SHAPE_PLURALS, ConceptObject, Scene, WorldObject, concept_caption,
    object_box, object_center, object_radius, render_concept_scene, render_scene,
    sample_scene, shape_mask, usable_colors, world_batch,
)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _scenes(n: int, seed: int = 7) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_world_batch_same_seed_is_identical() -> None:
    a, b = world_batch(3, 12), world_batch(3, 12)
    assert [c for _, c, _ in a] == [c for _, c, _ in b]
    assert [s for _, _, s in a] == [s for _, _, s in b]
    for (im_a, _, _), (im_b, _, _) in zip(a, b):
        assert im_a.mode == "RGB" and im_a.size == (64, 64)
        assert np.array_equal(_pixels(im_a), _pixels(im_b))


def test_world_batch_different_seed_differs() -> None:
    a, b = world_batch(3, 12), world_batch(4, 12)
    assert [c for _, c, _ in a] != [c for _, c, _ in b]
    assert any(not np.array_equal(_pixels(x), _pixels(y))
               for (x, _, _), (y, _, _) in zip(a, b))


def test_sample_scene_accepts_seed_or_rng_and_never_uses_global_random() -> None:
    random.seed(0)
    first = sample_scene(11)
    random.seed(12345)
    assert sample_scene(11) == first
    assert sample_scene(random.Random(11)) == first


def test_world_batch_other_sizes() -> None:
    for size in (32, 96):
        image, _, _ = world_batch(0, 1, size)[0]
        assert image.size == (size, size)


def _object_words(obj: WorldObject) -> list[str]:
    words = [obj.size, obj.color, obj.shape]
    if obj.pattern != "solid":
        words.append(obj.pattern)
    return words


def _assert_caption_complete(scene: Scene) -> None:
    caption = scene.caption()
    tail = f"on a {scene.background} background"
    assert caption.endswith(tail), caption
    objects_part = caption[: -len(tail)]
    assert "solid" not in caption
    for obj in scene.objects:
        for word in _object_words(obj):
            assert word in objects_part, (word, caption)
    if all(o.pattern == "solid" for o in scene.objects):
        assert not set(PATTERNS) & set(objects_part.split()), caption
    if scene.is_count:
        obj = scene.objects[0]
        assert caption.startswith(f"{COUNTS[len(scene.objects) - 1]} {obj.size} {obj.color}")
        assert SHAPE_PLURALS[obj.shape] in caption
    elif scene.relation is not None:
        first, second = scene.objects
        assert f"{first.shape} {scene.relation} a {second.size} {second.color}" in caption
    else:
        for obj in scene.objects:
            assert f"{obj.shape} {POSITION_PHRASES[obj.position]}" in caption, caption


def test_captions_mention_every_attribute() -> None:
    scenes = _scenes(300)
    kinds = {("count" if s.is_count else "relation" if s.relation else len(s.objects))
             for s in scenes}
    assert kinds == {"count", "relation", 1, 2}  # every kind of scene is exercised
    for scene in scenes:
        _assert_caption_complete(scene)


def test_caption_examples() -> None:
    pair = Scene((WorldObject("circle", "red", "striped", "large", "left"),
                  WorldObject("square", "blue", "solid", "small", "right")), "grid", "left of")
    assert pair.caption() == ("a large red striped circle left of a small blue square "
                              "on a grid background")
    two = Scene((WorldObject("circle", "green", size="small", position="left"),
                 WorldObject("circle", "green", size="small", position="right")),
                "plain white")
    assert two.caption() == "two small green circles on a plain white background"
    one = Scene((WorldObject("star", "yellow", "dotted", "small", "top"),), "gradient")
    assert one.caption() == "a small yellow dotted star at the top, on a gradient background"


def test_scene_validation_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match="color='pink'"):
        WorldObject("circle", "pink")
    with pytest.raises(ValueError, match="relation='above'"):
        Scene((WorldObject("circle", "red", position="left"),
               WorldObject("square", "blue", position="right")), "grid", "above")
    with pytest.raises(ValueError, match="share a position"):
        Scene((WorldObject("circle", "red"), WorldObject("square", "blue")), "grid")
    with pytest.raises(ValueError, match="background='forest'"):
        Scene((WorldObject("circle", "red"),), "forest")


def test_sampled_colours_stand_out_from_background() -> None:
    for scene in _scenes(200, seed=1):
        allowed = usable_colors(scene.background)
        assert all(o.color in allowed for o in scene.objects)


def test_rendered_colours_present_at_object_location() -> None:
    for scene in _scenes(60, seed=2):
        pixels = _pixels(render_scene(scene))
        for obj in scene.objects:
            mask = shape_mask(obj.shape, object_center(obj.position, 64),
                              object_radius(obj.size, 64), 64)
            x0, y0, x1, y1 = object_box(obj, 64)
            assert mask.sum() == mask[y0:y1, x0:x1].sum() > 40  # the box holds the shape
            inside = pixels[mask]  # (N, 3)
            primary = np.all(inside == COLOR_RGB[obj.color], axis=1).mean()
            second = np.all(inside == PATTERN_SHADES[obj.color], axis=1).mean()
            if obj.pattern == "solid":
                assert primary == 1.0, (scene.caption(), primary)
            else:  # the pattern is visible: both colours make up a real share
                assert primary > 0.4 and second > 0.04, (scene.caption(), primary, second)
                assert primary + second == 1.0


def test_object_colour_absent_away_from_objects() -> None:
    scene = Scene((WorldObject("square", "red", "solid", "small", "left"),), "plain gray")
    pixels = _pixels(render_scene(scene))
    x0, y0, x1, y1 = object_box(scene.objects[0], 64)
    red = np.all(pixels == COLOR_RGB["red"], axis=-1)
    assert red[y0:y1, x0:x1].sum() > 100
    assert red.sum() == red[y0:y1, x0:x1].sum()


def test_vocabulary_colours_are_distinct() -> None:
    rgbs = [COLOR_RGB[c] for c in COLORS] + [PATTERN_SHADES[c] for c in COLORS]
    assert len(set(rgbs)) == len(rgbs)
    assert len(BACKGROUNDS) == len(set(BACKGROUNDS))


def _concept() -> ConceptObject:
    return ConceptObject("checkered-star", "star", "orange", "checkered")


def test_concept_looks_never_occur_in_ordinary_scenes() -> None:
    drawn = {(o.shape, o.color, o.pattern) for _, _, scene in world_batch(11, 3000) for o in scene.objects}
    assert len(drawn) > 100                       # the sample covers most ordinary looks
    assert not drawn & CONCEPT_LOOKS
    for shape, color, pattern in CONCEPT_LOOKS:   # each part of a concept's look is ordinary on its own
        assert any(d[0] == shape and d[1] != color for d in drawn)
        assert any(d[1] == color and d[2] == pattern for d in drawn)
    with pytest.raises(ValueError, match="not reserved for concepts"):
        ConceptObject("x", "star", "red", "striped")
    # the world before the looks were reserved (the committed base's pretraining data) still has them
    unreserved = {(o.shape, o.color, o.pattern) for _, _, scene in world_batch(11, 3000, reserved=frozenset())
                  for o in scene.objects}
    assert unreserved & CONCEPT_LOOKS


def test_pretrain_presets_reserve_looks_only_for_the_successor() -> None:
    from purecc.testbed.pretrain import PRESETS
    assert not PRESETS["cpu"].reserve_concept_looks and not PRESETS["gpu"].reserve_concept_looks
    assert PRESETS["cpu-4x"].reserve_concept_looks and PRESETS["gpu-4x"].reserve_concept_looks
    assert PRESETS["gpu"].model.vae_factor == 8 and PRESETS["gpu-4x"].model.vae_factor == 4


def test_render_concept_scene_is_deterministic_and_matches_an_ordinary_render() -> None:
    concept = _concept()
    a = _pixels(render_concept_scene(concept, "grid", "center", 64, random.Random(5)))
    b = _pixels(render_concept_scene(concept, "grid", "center", 64, 5))
    assert np.array_equal(a, b)
    for rgb in (COLOR_RGB["orange"], PATTERN_SHADES["orange"]):
        assert np.all(a[16:48, 16:48] == rgb, axis=-1).sum() > 30
    unjittered = _pixels(render_concept_scene(concept, "grid", "center", 64))
    ordinary = _pixels(render_scene(Scene((concept.as_object("center"),), "grid")))
    assert np.array_equal(unjittered, ordinary)
    other = _pixels(render_concept_scene(concept, "plain black", "left", 64))
    assert not np.array_equal(a, other)


def test_concept_caption_placeholder() -> None:
    concept = _concept()
    assert (concept_caption(concept, "striped blue", "left")
            == "a [v] star on the left, on a striped blue background")
    assert (concept_caption(concept, "striped blue", "left", "")
            == "a star on the left, on a striped blue background")
