"""Recipes and pack plans: validation naming the bad field, and lossless round trips."""

from __future__ import annotations

import json
import re

import pytest

from purecc.pack import ConceptPlan, PackPlan, ValidationSettings
from purecc.recipe import StageRecipe, stage_recipe


def test_seed_recipes():
    one, two = stage_recipe(1), stage_recipe(2)
    assert (one.lr, one.steps, one.grad_accum, one.precondition) == (4e-4, 1000, 4, True)
    assert (two.lr, two.steps, two.grad_accum, two.precondition, two.eta) == (4e-4, 800, 1, False, 0.1)


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", 0.0), ("resolution", 72),
                                          ("lambda_mode", "magic"), ("extractor", "clip"), ("eta", -1.0),
                                          ("rank", 0), ("max_grad_norm", 0.0), ("checkpoint_every", 0),
                                          ("lambda_min", 3.0), ("lambda_min", -0.1), ("r_reference", "zero"),
                                          ("betas", (0.9, 1.0)), ("betas", (-0.1, 0.9)), ("adam_eps", 0.0),
                                          ("weight_decay", -1e-4), ("logit_std", 0.0), ("lambda_value", -1.0),
                                          ("crop", "corner"), ("flip_prob", 1.5), ("alpha", 0.0),
                                          ("lr", float("inf")), ("logit_mean", float("nan")),
                                          ("max_grad_norm", float("inf"))])
def test_invalid_recipe_names_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
        stage_recipe(1, **{field: value})
    with pytest.raises(ValueError, match="stage=3"):
        StageRecipe(stage=3)


def test_recipe_round_trips_through_json():
    r = stage_recipe(2, steps=7, betas=[0.8, 0.95], lambda_mode="adaptive")
    assert r.betas == (0.8, 0.95)
    assert StageRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_pack_plan_validation():
    member = ConceptPlan("zig", "zqx", "m.csv", stage_recipe(1))
    with pytest.raises(ValueError, match="members"):
        PackPlan(name="p", stage=1, base_model="m", members=())
    with pytest.raises(ValueError, match="another stage"):
        PackPlan(name="p", stage=2, base_model="m", members=(member,))
    with pytest.raises(ValueError, match="concept_id"):
        ConceptPlan("Bad/Id", "zqx", "m.csv", stage_recipe(1))
    with pytest.raises(ValueError, match="trigger"):
        ConceptPlan("zig", "two words", "m.csv", stage_recipe(1))


def test_pack_plan_round_trips_through_json():
    plan = PackPlan(name="p", stage=1, base_model="m", validation=ValidationSettings(steps=3, guidance=2.0),
                    members=(ConceptPlan("zig", "zqx", "m.csv", stage_recipe(1, steps=5), seed=4, data_hash="ab",
                                         validation_prompts=("a [v]",), key="zig:ab:0",
                                         provenance={"batch": "b"}),))
    again = PackPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.member("zig").recipe.steps == 5
    with pytest.raises(KeyError):
        plan.member("other")
