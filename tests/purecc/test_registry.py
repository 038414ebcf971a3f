import pytest
import torch

from purecc.adapter_files import AdapterFileError, AdapterManifest, export_slot
from purecc.bank import attach_bank
from purecc.recipe import StageRecipe, stage_recipe
from purecc.registry import AdapterRegistry


def _adapter(tiny_pipe, dest, cid, seed):
    bank = attach_bank(tiny_pipe.transformer, 1) if not hasattr(tiny_pipe.transformer, "adapter_bank") \
        else tiny_pipe.transformer.adapter_bank
    flat = torch.randn(bank.params_per_slot, generator=torch.Generator().manual_seed(seed))
    return export_slot(bank, flat, dest, AdapterManifest(cid, "sks", 2, 3, 4, 4.0, [], "fp"))


def test_publish_list_fetch_and_replace(tiny_pipe, tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    assert reg.list() == [] and not (tmp_path / "store" / "adapters").exists()  # reading writes nothing
    reg.publish("zig", _adapter(tiny_pipe, tmp_path / "a", "zig", 0))
    assert [m.concept_id for m in reg.list()] == ["zig"]
    first = (reg.fetch("zig", tmp_path / "cache") / "pytorch_lora_weights.safetensors").read_bytes()
    reg.publish("zig", _adapter(tiny_pipe, tmp_path / "b", "zig", 1))
    again = (reg.fetch("zig", tmp_path / "cache") / "pytorch_lora_weights.safetensors").read_bytes()
    assert first != again
    assert not [p for p in (tmp_path / "store" / "adapters").iterdir() if p.name.startswith(".")]
    with pytest.raises(KeyError):
        reg.fetch("nope", tmp_path / "cache")


def test_publish_refuses_bad_ids_and_incomplete_folders(tiny_pipe, tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    with pytest.raises(ValueError, match="not a valid concept id"):
        reg.path_of("../../etc")
    with pytest.raises(AdapterFileError, match="no purecc_adapter.json"):
        reg.publish("zig", tmp_path)


def test_recipe_round_trip_and_validation():
    r = stage_recipe(2, steps=5, lambda_mode="adaptive")
    assert StageRecipe.from_dict(r.to_dict()) == r
    assert StageRecipe.from_dict({**r.to_dict(), "betas": [0.9, 0.99]}).betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="lambda_mode='sometimes'"):
        stage_recipe(2, lambda_mode="sometimes")
    assert (stage_recipe(1).lr, stage_recipe(1).steps, stage_recipe(1).grad_accum) == (4e-4, 1000, 4)
    assert (stage_recipe(2).lr, stage_recipe(2).steps, stage_recipe(2).eta) == (1e-4, 800, 0.1)
