import json

import pytest
import torch
from safetensors import safe_open

from purecc.adapter_files import (DIFFUSERS_WEIGHTS, EMBEDDINGS, MANIFEST, PEFT_CONFIG, PEFT_WEIGHTS, AdapterFileError,
                                  AdapterManifest, export_slot, load_concept, load_flat)
from purecc.bank import attach_bank
from purecc.model import base_fingerprint


@pytest.fixture()
def exported(tiny_pipe, tmp_path):
    bank = attach_bank(tiny_pipe.transformer, 2)
    flat = torch.randn(bank.params_per_slot, generator=torch.Generator().manual_seed(0))
    fp = base_fingerprint(tiny_pipe.transformer)
    folder = export_slot(bank, flat, tmp_path / "c", AdapterManifest("c", "sks", 2, 10, 4, 4.0, [], fp,
                                                                       metrics={"final_loss": 0.5}))
    return bank, flat, fp, folder


def test_files_keys_and_manifest(exported):
    bank, flat, fp, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_WEIGHTS, MANIFEST])
    with safe_open(str(folder / DIFFUSERS_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert not any(k.startswith("transformer.base_model") for k in keys)
    assert len(keys) == 2 * len(bank.specs)
    m = json.loads((folder / MANIFEST).read_text())
    assert m["concept_id"] == "c" and m["stage"] == 2 and m["rank"] == 4 and m["base_fingerprint"] == fp
    assert len(m["targets"]) == len(bank.specs) and set(m["files"]) == {PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_WEIGHTS}
    cfg = json.loads((folder / PEFT_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["peft_type"] == "LORA"
    assert not list(folder.glob(".*.tmp"))


def test_round_trip(exported):
    bank, flat, fp, folder = exported
    manifest, again = load_flat(bank, folder, base_fingerprint=fp)
    assert torch.equal(again, flat) and manifest.metrics["final_loss"] == 0.5


def test_tampered_file_is_refused(exported):
    bank, _, fp, folder = exported
    data = bytearray((folder / DIFFUSERS_WEIGHTS).read_bytes())
    data[-1] ^= 1
    (folder / DIFFUSERS_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="sha256 of pytorch_lora_weights"):
        load_flat(bank, folder, base_fingerprint=fp)


def test_wrong_base_rank_or_missing_manifest_is_refused(exported, tmp_path):
    bank, _, fp, folder = exported
    with pytest.raises(AdapterFileError, match="trained on base"):
        load_flat(bank, folder, base_fingerprint="0" * 32)
    m = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**m, "rank": 8}))
    with pytest.raises(AdapterFileError, match="rank 8"):
        load_flat(bank, folder, base_fingerprint=fp)
    with pytest.raises(AdapterFileError, match="no purecc_adapter.json"):
        load_flat(bank, tmp_path)


def test_a_concept_trained_at_another_alpha_keeps_its_scale_in_any_bank(tiny_model_dir, tmp_path):
    from purecc.model import load_pipeline

    trained = attach_bank(load_pipeline(str(tiny_model_dir)).transformer, 1, rank=4, alpha=8.0)   # scale 2
    served = attach_bank(load_pipeline(str(tiny_model_dir)).transformer, 1, rank=4)                # alpha = rank
    flat = torch.randn(trained.params_per_slot, generator=torch.Generator().manual_seed(1))
    fp = base_fingerprint(load_pipeline(str(tiny_model_dir)).transformer)
    folder = export_slot(trained, flat, tmp_path / "c", AdapterManifest("c", "sks", 2, 10, 4, 8.0, [], fp))
    manifest, loaded = load_flat(served, folder, base_fingerprint=fp)
    assert manifest.alpha == 8.0 and served.scale == 1.0 and trained.scale == 2.0
    for name, (a, b) in trained.unflatten(flat).items():          # the same weight change B A * alpha / r
        a2, b2 = served.unflatten(loaded)[name]
        torch.testing.assert_close(served.scale * b2 @ a2, trained.scale * b @ a)
    again = load_flat(trained, folder, base_fingerprint=fp)[1]       # and the bank it came from reads it as it was
    assert torch.equal(again, flat)


def test_invalid_concept_id_cannot_become_a_path(exported, tmp_path):
    bank, flat, fp, _ = exported
    with pytest.raises(ValueError, match="not a valid concept id"):
        export_slot(bank, flat, tmp_path / "x", AdapterManifest("../etc", "sks", 2, 1, 4, 4.0, [], fp))


def test_a_non_finite_adapter_is_refused_on_load_even_when_correctly_hashed(exported):
    from safetensors.torch import load_file, save_file

    from purecc.adapter_files import NonFiniteAdapter
    from purecc.fileio import sha256_file

    bank, flat, fp, folder = exported
    weights = load_file(folder / DIFFUSERS_WEIGHTS)
    key = sorted(weights)[0]
    weights[key][0, 0] = float("nan")
    save_file(weights, folder / DIFFUSERS_WEIGHTS)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][DIFFUSERS_WEIGHTS] = sha256_file(folder / DIFFUSERS_WEIGHTS)   # hashes match again
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(NonFiniteAdapter, match="1 of .* weights are not finite"):
        load_flat(bank, folder, base_fingerprint=fp)


def test_a_non_finite_slot_is_never_exported(exported, tmp_path):
    from purecc.adapter_files import NonFiniteAdapter

    bank, flat, fp, _ = exported
    bad = flat.clone()
    bad[3] = float("inf")
    with pytest.raises(NonFiniteAdapter, match="export c"):
        export_slot(bank, bad, tmp_path / "bad", AdapterManifest("c", "sks", 2, 10, 4, 4.0, [], fp))
    assert not (tmp_path / "bad").exists()


def test_the_same_concept_exported_twice_is_the_same_bytes(exported, tmp_path):
    """Content hashes (manifest sha256s, registry versions) must depend on the content alone: safetensors
    writes metadata in a random order per call, which the writer has to undo."""
    bank, flat, fp, folder = exported
    emb = torch.randn(bank.embeddings.shape, generator=torch.Generator().manual_seed(1))
    runs = []
    for i in range(6):
        m = AdapterManifest("c", "sks", 2, 10, 4, 4.0, [], fp, created=1.0)
        out = export_slot(bank, flat, tmp_path / f"again{i}", m, emb=emb)
        runs.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert all(r == runs[0] for r in runs[1:])
    with safe_open(str(tmp_path / "again0" / EMBEDDINGS), "pt") as f:     # still a valid file, metadata kept
        assert f.metadata()["trigger"] == "sks" and torch.equal(f.get_tensor("layerwise"), emb)
    _, back, back_emb = load_concept(bank, tmp_path / "again0", base_fingerprint=fp)
    assert torch.equal(back, flat) and torch.equal(back_emb, emb)
