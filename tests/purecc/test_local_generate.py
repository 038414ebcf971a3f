"""``purecc generate`` (local mode): each ``--concept`` folder gets its own slot and its own weight."""

import json
import shutil

import pytest

from purecc.cli import main
from purecc.generate import load_concepts
from purecc.model import load_pipeline
from purecc.recipe import stage_recipe
from purecc.trainer import ConceptJob, PackTrainer

CID, TRIGGER = "checkered-star", "zqx"


@pytest.fixture(scope="module")
def same_id_folders(tiny_model_dir, sample_manifests, tmp_path_factory):
    """Two adapters of one concept id (as its stage1/stage2 folders would be): 4 steps, then 12 more."""
    recipe = stage_recipe(1, steps=16, resolution=64, grad_accum=1, lr=2e-2)
    t = PackTrainer(load_pipeline(str(tiny_model_dir)), [ConceptJob(CID, TRIGGER, sample_manifests[CID], recipe)])
    t.setup()
    root = tmp_path_factory.mktemp("same-id")
    t.train(max_steps=4)
    first = t.export(CID, root / "first")
    t.train()
    return first, t.export(CID, root / "second")


def _render(tiny_model_dir, out, *concepts) -> bytes:
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", f"a <{CID}> on a grid", "--seed", "3",
            "--steps", "3", "--width", "64", "--height", "64", "--out", str(out)]
    for folder, weight in concepts:
        args += ["--concept", f"{folder}:{weight}"]
    assert main(args) == 0
    return (out / "image_3.png").read_bytes()


def test_each_folder_gets_its_own_weight(tmp_path, tiny_model_dir, same_id_folders):
    first, second = same_id_folders
    alone_first = _render(tiny_model_dir, tmp_path / "a1", (first, 1.0))
    alone_second = _render(tiny_model_dir, tmp_path / "a2", (second, 1.0))
    assert alone_first != alone_second
    assert _render(tiny_model_dir, tmp_path / "b1", (first, 1.0), (second, 0.0)) == alone_first
    assert _render(tiny_model_dir, tmp_path / "b2", (first, 0.0), (second, 1.0)) == alone_second


def test_folders_of_one_id_must_share_the_trigger(tmp_path, tiny_pipe, same_id_folders):
    first, second = same_id_folders
    other = shutil.copytree(second, tmp_path / "other-trigger")
    manifest = json.loads((other / "purecc_adapter.json").read_text())
    (other / "purecc_adapter.json").write_text(json.dumps({**manifest, "trigger": "vlk"}))
    with pytest.raises(ValueError, match="trigger") as err:
        load_concepts(tiny_pipe, [first, other])
    assert str(first) in str(err.value) and str(other) in str(err.value)


def test_slot_of_folder_routes_each_folder(tiny_pipe, same_id_folders):
    first, second = same_id_folders
    loaded = load_concepts(tiny_pipe, [first, second])
    assert loaded.slot_of_folder == {str(first): 0, str(second): 1}
    assert loaded.triggers == {CID: TRIGGER} and loaded.slot_of == {CID: 0}
