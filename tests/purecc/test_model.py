import json
import shutil

import pytest
import torch

from purecc.model import ModelConfig, ModelFolderError, base_fingerprint, load_pipeline


def test_generates_from_folder_offline(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    pipe = load_pipeline(ModelConfig(path=str(tiny_model_dir), dtype="float32", device="cpu"))
    import os
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    img = pipe("a red circle", height=64, width=64, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
    assert pipe.text_encoder_3 is None


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_pipeline(str(tmp_path / "nope"))


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelFolderError, match="no model_index.json"):
        load_pipeline(str(tmp_path))


def test_not_an_sd3_pipeline(tmp_path, tiny_model_dir):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match="not an SD3"):
        load_pipeline(str(copy))


def test_missing_component(tmp_path, tiny_model_dir):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(ModelFolderError, match="vae"):
        load_pipeline(str(copy))


def test_dtype_choice_and_bad_dtype():
    assert ModelConfig(path="x", device="cpu").resolved_dtype() == torch.float32
    assert ModelConfig(path="x", device="cpu", dtype="bfloat16").resolved_dtype() == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(path="x", dtype="float8").resolved_dtype()


def test_fingerprint_is_stable_across_loads_and_bank(tiny_model_dir):
    from purecc.bank import attach_bank

    a, b = load_pipeline(str(tiny_model_dir)), load_pipeline(str(tiny_model_dir))
    before = base_fingerprint(a.transformer)
    attach_bank(a.transformer, 2)
    assert base_fingerprint(a.transformer) == before == base_fingerprint(b.transformer)
