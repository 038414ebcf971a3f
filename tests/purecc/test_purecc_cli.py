import json

from PIL import Image

from purecc.cli import main


def test_train_both_stages_then_generate(tmp_path, tiny_model_dir, sample_manifests, capsys):
    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_model_dir), "--concept", "checkered-star", "zqx",
               str(sample_manifests["checkered-star"]), "--stage", "both", "--out", str(out), "--steps1", "3",
               "--steps2", "2", "--resolution", "64", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "checkered-star stage 1: 3 steps" in text and "checkered-star stage 2: 2 steps" in text
    for stage in (1, 2):
        m = json.loads((out / "checkered-star" / f"stage{stage}" / "purecc_adapter.json").read_text())
        assert m["stage"] == stage and m["trigger"] == "zqx"
    rc = main(["generate", "--model", str(tiny_model_dir), "--concept", f"{out / 'checkered-star' / 'stage2'}:0.9",
               "--prompt", "a <checkered-star> on a grid background", "--seed", "4", "--steps", "2",
               "--width", "64", "--height", "48", "--num-images", "2", "--out", str(tmp_path / "png")])
    assert rc == 0
    images = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in images] == ["image_4.png", "image_5.png"]
    assert Image.open(images[0]).size == (64, 48)


def test_bad_inputs_give_clear_errors(tmp_path, tiny_model_dir, capsys):
    assert main(["train", "--model", str(tmp_path / "none"), "--concept", "a", "sks", "m.csv",
                 "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_model_dir), "--concept", "Bad/Id", "sks", "m.csv",
                 "--out", str(tmp_path)]) == 2
    assert "not a valid concept id" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--num-images", "99"]) == 2
    assert "--num-images" in capsys.readouterr().err
