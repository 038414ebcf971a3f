"""Tests for the testbed's world metrics: prompt facts, the world reader, the toy-world metrics."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from purecc.testbed.facts import caption_facts, concept_positions, parse_prompt, scene_facts
from purecc.testbed.metrics import (concept_fidelity, concept_identity, concept_references, drift_unrelated,
                                    fact_recall, paired_interval, preservation_same_seed, text_alignment,
                                    total_variation)
from purecc.testbed.reader import load_reader, world_metric_path
from purecc.testbed.samples import PACKAGED_SAMPLES_DIR
from purecc.testbed.train_reader import EVAL_SEED0, TRAIN_SEED0, ReaderTraining, fact_accuracy
from purecc.testbed.world import POSITION_PHRASES, world_batch

# Accuracy of the committed reader on world images it never saw (seeds far from training's).
# Measured when committed (256 images): background, present, shape, colour and size 1.0, pattern 0.998
# (the reader before, 2400 steps without the continuation: pattern 0.918, mostly striped vs checkered).
READER_MIN_ACCURACY = {"background": 0.97, "present": 0.97, "shape": 0.97, "color": 0.97,
                       "pattern": 0.97, "size": 0.97}


@pytest.fixture(scope="module")
def reader():
    return load_reader()


def _manifest(cid: str):
    return PACKAGED_SAMPLES_DIR / cid / "manifest.csv"


# ---------------------------------------------------------------- facts

def test_caption_facts_match_scene_facts_for_world_captions():
    for _, caption, scene in world_batch(11, 400):
        assert caption_facts(caption) == scene_facts(scene), caption


def test_concept_and_composition_prompts_state_only_named_attributes():
    facts = caption_facts("a zqx star on the left and a vlk circle at the top, on a grid background")
    assert facts == {"background": "grid", "left.shape": "star", "top.shape": "circle"}
    assert concept_positions("a zqx star on the left and a vlk circle at the top, on a grid background",
                             "vlk") == ["top"]
    assert caption_facts("a small red circle in the center, on a plain gray background")["center.pattern"] == "solid"


@pytest.mark.parametrize("bad", ["a red circle", "a red circle on the left, on a purple background",
                                 "a red circle somewhere, on a grid background"])
def test_parse_prompt_names_the_bad_prompt(bad):
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(bad)


# ---------------------------------------------------------------- the reader

def test_reader_reads_fresh_world_images_above_stated_accuracy(reader):
    assert EVAL_SEED0 > TRAIN_SEED0 + 10 * ReaderTraining.steps  # evaluation seeds are never trained on
    acc = fact_accuracy(reader, n=256, seed=EVAL_SEED0 + 12345)
    low = {k: round(acc[k], 3) for k, floor in READER_MIN_ACCURACY.items() if acc[k] < floor}
    assert not low, f"reader accuracy below the stated floor: {low} (floors {READER_MIN_ACCURACY})"


def test_reader_refuses_tampered_weights(tmp_path):
    folder = tmp_path / "metric"
    shutil.copytree(world_metric_path(), folder)
    data = bytearray((folder / "reader.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "reader.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_reader(folder)


def test_reader_training_continues_a_saved_reader(reader):
    from purecc.testbed.train_reader import train_reader

    # at lr 0 the continued reader is the saved one, weight for weight; at a real lr it moves away
    kept, losses = train_reader(ReaderTraining(steps=2, batch=4, lr=0.0, seed=1, init=str(world_metric_path())),
                                progress=False)
    moved, _ = train_reader(ReaderTraining(steps=2, batch=4, lr=1e-3, seed=1, init=str(world_metric_path())),
                            progress=False)
    saved = reader.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in kept.state_dict().items()) and len(losses) == 2
    assert any(not torch.equal(v, saved[k]) for k, v in moved.state_dict().items())


# ---------------------------------------------------------------- metrics

def test_text_alignment_is_high_on_truth_and_low_on_other_prompts(reader):
    batch = world_batch(EVAL_SEED0 + 777, 48)
    images, captions = [b[0] for b in batch], [b[1] for b in batch]
    truth = text_alignment(reader, images, captions).mean()
    shuffled = text_alignment(reader, images, captions[1:] + captions[:1]).mean()
    assert truth > 0.95 and shuffled < 0.5, (truth, shuffled)


def test_concept_fidelity_separates_concepts(reader):
    star, star_pos = concept_references(_manifest("checkered-star"))
    circle, circle_pos = concept_references(_manifest("striped-circle"))
    own = concept_fidelity(reader, star, star_pos, star, star_pos).mean()
    other = concept_fidelity(reader, circle, circle_pos, star, star_pos).mean()
    assert own > other + 0.2, (own, other)


def test_concept_references_find_the_placeholder_position():
    from purecc.testbed.samples import SAMPLE_CONCEPTS, concept_views
    images, positions = concept_references(_manifest("checkered-star"))
    assert positions == [pos for _, pos in concept_views(SAMPLE_CONCEPTS[0])]
    assert len(images) == 5 and len(set(positions)) == 5 and images[0].size == (64, 64)


def test_preservation_ignores_the_concept_region_and_sees_the_rest(reader):
    base = Image.new("RGB", (64, 64), (128, 128, 128))
    changed_concept = base.copy()
    changed_concept.paste((255, 0, 0), (20, 20, 44, 44))       # inside the centre object's box
    changed_context = base.copy()
    changed_context.paste((255, 0, 0), (0, 0, 8, 8))            # a corner
    res = preservation_same_seed(reader, [base, base], [changed_concept, changed_context],
                                 [["center"], ["center"]])
    assert res["context_psnr"][0] == float("inf")
    assert res["context_psnr"][1] < 40


def test_drift_is_zero_for_identical_models(reader):
    batch = world_batch(EVAL_SEED0 + 5, 8)
    images, captions = [b[0] for b in batch], [b[1] for b in batch]
    d = drift_unrelated(reader, images, images, captions)
    assert d["alignment_delta"] == 0 and d["attribute_tv"] == 0 and d["same_seed_agreement"] == 1


def test_concept_identity_needs_the_whole_look(reader):
    from purecc.testbed.samples import CONCEPT_OBJECTS
    from purecc.testbed.world import render_concept_scene
    star, diamond = CONCEPT_OBJECTS["checkered-star"], CONCEPT_OBJECTS["dotted-diamond"]
    views = [("grid", "center"), ("plain gray", "left"), ("gradient", "right"), ("plain white", "top")]
    images = [render_concept_scene(star, bg, pos) for bg, pos in views]
    positions = [pos for _, pos in views]
    assert concept_identity(reader, images, positions, star.look).tolist() == [True] * 4
    assert not concept_identity(reader, images, positions, diamond.look).any()
    assert not concept_identity(reader, images, positions, ("star", "orange", "striped")).any()
    assert not concept_identity(reader, images, ["bottom"] * 4, star.look).any()   # nothing stands there
    with pytest.raises(ValueError, match="positions"):
        concept_identity(reader, images, positions[:2], star.look)


def test_paired_interval_is_the_t_interval_of_the_differences():
    mean, lo, hi = paired_interval([1.5, 2.0, 3.5], [0.5, 0.0, 0.5])      # differences 1, 2, 3
    assert mean == pytest.approx(2.0)
    assert (lo, hi) == pytest.approx((2.0 - 4.303 / 3 ** 0.5, 2.0 + 4.303 / 3 ** 0.5))
    assert paired_interval([0.7, 0.8], [0.6, 0.7])[1] == pytest.approx(0.1)   # no spread: a point
    assert paired_interval([1.0], [0.5]) == (0.5, float("-inf"), float("inf"))
    many = [float(i % 3) for i in range(40)]
    m, lo, hi = paired_interval(many, [0.0] * 40)
    assert hi - lo == pytest.approx(2 * 1.96 * float(__import__("numpy").std(many, ddof=1)) / 40 ** 0.5)
    with pytest.raises(ValueError, match="equally long"):
        paired_interval([1.0, 2.0], [1.0])


def test_fact_recall_and_total_variation():
    from collections import Counter

    assert fact_recall({"a": "1", "b": "2"}, {"a": "1", "b": "3"}) == 0.5
    assert total_variation(Counter("aabb"), Counter("aabb")) == 0
    assert total_variation(Counter("aa"), Counter("bb")) == 1
    with pytest.raises(ValueError):
        fact_recall({}, {})


# ---------------------------------------------------------------- fidelity of a customised model

# A short stage 1 (DreamBooth LoRA) on the world base must draw its concept closer to the
# references than the base does with the same prompts and noise: reader-embedding fidelity.
FIDELITY_STEPS = 60
FIDELITY_MIN_GAIN = 0.5  # measured: 0.148 -> 0.961 on the 4x base (0.027 -> 0.719 on the 8x base, earlier reader)


def test_customised_model_scores_higher_fidelity_than_the_base(reader, tmp_path):
    from purecc.generate import RenderSettings, Sample, generate, load_concepts
    from purecc.local_train import train_concepts
    from purecc.model import ModelConfig, load_pipeline
    from purecc.testbed import world_base_path

    base = str(world_base_path())
    manifest = _manifest("checkered-star")
    train_concepts(model=base, concepts=[("checkered-star", "zqx", str(manifest))], out=tmp_path, stages=(1,),
                   steps={1: FIDELITY_STEPS}, overrides={"resolution": 64, "lr": 2e-3, "grad_accum": 1,
                                                         "checkpoint_every": 10 ** 6},
                   progress=False)
    pipe = load_pipeline(ModelConfig(path=base))
    slot_of = load_concepts(pipe, [tmp_path / "checkered-star" / "stage1"]).slot_of
    views = [("grid", "center"), ("plain gray", "left"), ("gradient", "right"), ("striped gray", "top")]
    prompts = [f"a zqx star {POSITION_PHRASES[pos]}, on a {bg} background" for bg, pos in views]
    settings = RenderSettings(steps=16, guidance=5.0, width=64, height=64)
    base_imgs = generate(pipe, [Sample(p, 7 + i) for i, p in enumerate(prompts)], slot_of, settings)
    custom_imgs = generate(pipe, [Sample(p, 7 + i, (("checkered-star", 1.0),)) for i, p in enumerate(prompts)],
                           slot_of, settings)
    refs, ref_pos = concept_references(manifest)
    positions = [pos for _, pos in views]
    before = concept_fidelity(reader, base_imgs, positions, refs, ref_pos).mean()
    after = concept_fidelity(reader, custom_imgs, positions, refs, ref_pos).mean()
    assert after > before + FIDELITY_MIN_GAIN, (before, after)
