"""Recipes from files and ``--set``: parsed as YAML scalars, validated field by field."""

from __future__ import annotations

import pytest

from purecc.recipe import stage_recipe
from purecc.recipe_overrides import build_recipe, parse_set


@pytest.mark.parametrize("item,keys,value", [
    ("stage1.lr=1e-4", ["stage1", "lr"], 1e-4), ("resolution=64", ["resolution"], 64),
    ("stage2.precondition=true", ["stage2", "precondition"], True),
    ('validation.prompts=["a [v]", b]', ["validation", "prompts"], ["a [v]", "b"]),
    ("stage1.crop=random", ["stage1", "crop"], "random")])
def test_parse_set_reads_yaml_scalars(item, keys, value):
    assert parse_set(item) == (keys, value)


@pytest.mark.parametrize("item", ["lr", "=3", "stage1..lr=3", "stage1.lr=[1"])
def test_malformed_set_is_refused(item):
    with pytest.raises(ValueError, match="--set"):
        parse_set(item)


def test_file_then_flags_then_sets(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("resolution: 32\nstage1: {lr: 0.002, steps: 50}\nstage2: {eta: 1.5}\nlambda_mode: increment\n")
    r = build_recipe(f, ["stage1.steps=7", "stage2.resolution=48"], [(["stage1", "steps"], 9)])
    s1, s2 = r.stage(1), r.stage(2)
    assert (s1.lr, s1.steps, s1.resolution, s1.grad_accum) == (0.002, 7, 32, 4)
    assert (s2.eta, s2.lambda_mode, s2.resolution, s2.lr) == (1.5, "increment", 48, stage_recipe(2).lr)
    assert s1.lambda_mode == stage_recipe(1).lambda_mode   # the stage-2 knobs at the top leave stage 1 alone
    assert build_recipe().stage(2) == stage_recipe(2)  # nothing given: the seed's recipe


@pytest.mark.parametrize("sets,message", [
    (["stage1.lrr=1"], "recipe: stage1.lrr: unknown field"),
    (["warmup=3"], "recipe: warmup: unknown field"),
    (["stage2.lambda_mode=sometimes"], "recipe: stage2.lambda_mode: Input should be 'fixed', 'adaptive', 'increment' or 'extractor'"),
    (["resolution=65"], "recipe: resolution: Input should be a multiple of 16"),
    (["stage1.lr=-1"], "recipe: stage1.lr: Input should be greater than 0"),
    (["stage1=3"], "recipe: stage1:"),
    (["stage1.lr=3", "stage1.lr.x=1"], "stage1.lr.x: lr is a value, not a section"),
])
def test_bad_fields_are_named(sets, message):
    with pytest.raises(ValueError) as err:
        build_recipe(sets=sets)
    assert message in str(err.value)


def test_recipe_file_must_be_a_mapping(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        build_recipe(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_recipe(tmp_path / "none.yaml")


def test_effective_recipe_lists_every_field():
    eff = build_recipe(sets=["stage2.steps=5", "validation.every=2"]).effective()
    assert eff["stage2"]["steps"] == 5 and eff["stage1"]["steps"] == 1000 and eff["validation"]["every"] == 2
    assert set(eff["stage1"]) == set(stage_recipe(1).to_dict()) - {"stage"}
    # what --show-recipe prints is itself a valid recipe file giving the same recipe
    assert build_recipe(sets=[f"stage2.{k}={v}" for k, v in eff["stage2"].items()]).stage(2) == stage_recipe(2, steps=5)


def test_show_recipe_output_is_a_recipe_file_of_the_same_run(tmp_path):
    import yaml

    r = build_recipe(sets=["stage1.lr=3e-4", "lambda_mode=adaptive", "validation.prompts=['a [v]']", "seed=5"])
    f = tmp_path / "shown.yaml"
    f.write_text(yaml.safe_dump(r.effective()))
    again = build_recipe(f)
    assert (again.stage(1), again.stage(2), again.seed, again.validation) == (r.stage(1), r.stage(2), 5, r.validation)
