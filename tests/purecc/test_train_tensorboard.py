"""``purecc train`` with a recipe from the command line, validation images and TensorBoard event files."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from purecc.cli import main


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_train_with_set_validation_and_tensorboard(tmp_path, tiny_model_dir, sample_manifests, capsys):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"resolution": 64, "stage1": {"steps": 4, "grad_accum": 1, "lr": 5e-3},
                                      "stage2": {"steps": 2}, "validation": {"steps": 2}}))
    rc = main(["train", "--model", str(tiny_model_dir), "--concept", "checkered-star", "zqx",
               str(sample_manifests["checkered-star"]), "--out", str(out), "--recipe", str(recipe),
               "--set", "stage2.lambda_mode=adaptive", "--set", "validation.every=2",
               "--validation-prompt", "a [v] star", "--tensorboard", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "checkered-star stage 1: 4 steps" in text and "checkered-star stage 2: 2 steps" in text
    # the recipe the run used is the one asked for (it is recorded in the checkpoint)
    state = json.loads((out / "checkered-star" / "ckpt-stage1" / "state.json").read_text())
    assert (state["recipe"]["lr"], state["recipe"]["grad_accum"], state["recipe"]["resolution"]) == (5e-3, 1, 64)
    assert json.loads((out / "checkered-star" / "ckpt-stage2" / "state.json").read_text())["recipe"]["lambda_mode"] \
        == "adaptive"
    # validation: at the end of each stage (in the adapter folder) and at step 2 of stage 1 (every 2, not the last)
    for stage in (1, 2):
        png = out / "checkered-star" / f"stage{stage}" / "validation" / f"stage{stage}" / "00.png"
        assert Image.open(png).size == (64, 64)
    assert (out / "checkered-star" / "validation" / "stage1" / "step-000002" / "00.png").is_file()
    assert not (out / "checkered-star" / "validation" / "stage1" / "step-000004").exists()
    # TensorBoard: per-step losses of both stages, lambda of stage 2, validation images
    acc = _events(out / "tensorboard" / "checkered-star")
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("stage1/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("stage2/loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("stage2/lambda")] == [1, 2]
    assert all(e.value > 0 for e in acc.Scalars("stage1/loss"))
    assert "stage1/lambda" not in tags["scalars"]          # stage 1 has no lambda
    assert [e.step for e in acc.Images("stage1/validation/00")] == [2, 4]
    assert [e.step for e in acc.Images("stage2/validation/00")] == [2]


def test_show_recipe_prints_the_effective_recipe(capsys):
    assert main(["train", "--show-recipe", "--set", "stage1.lr=1e-4", "--steps2", "7", "--resolution", "64"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stage1"]["lr"] == 1e-4 and shown["stage2"]["steps"] == 7 and shown["stage2"]["resolution"] == 64
    assert shown["stage1"]["steps"] == 1000 and shown["stage2"]["lr"] == 4e-4


@pytest.mark.parametrize("args,message", [
    (["--set", "stage1.lrr=1"], "recipe: stage1.lrr: unknown field"),
    (["--set", "stage2.rank=0"], "recipe: stage2.rank: Input should be greater than or equal to 1"),
    ([], "--model: required"),
])
def test_train_refuses_bad_recipes_naming_the_field(args, message, capsys):
    assert main(["train", *args]) == 2
    assert message in capsys.readouterr().err


def test_rendering_during_a_stage_leaves_the_training_unchanged(tmp_path, tiny_model_dir, sample_manifests):
    import torch
    from safetensors.torch import load_file

    common = ["train", "--model", str(tiny_model_dir), "--concept", "checkered-star", "zqx",
              str(sample_manifests["checkered-star"]), "--stage", "1", "--steps1", "4", "--resolution", "64",
              "--set", "stage1.grad_accum=1", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "rendered"), "--validation-prompt", "a [v] star",
                          "--set", "validation.every=1", "--set", "validation.steps=2"]) == 0
    assert len(list((tmp_path / "rendered" / "checkered-star" / "validation" / "stage1").iterdir())) == 3
    want, have = (load_file(tmp_path / run / "checkered-star" / "stage1" / "pytorch_lora_weights.safetensors")
                  for run in ("plain", "rendered"))
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
