import pytest
import torch

from purecc.adapter_files import DIFFUSERS_WEIGHTS, POINTER, AdapterFileError, AdapterManifest, export_slot
from purecc.bank import attach_bank
from purecc.recipe import StageRecipe, stage_recipe
from purecc.registry import AdapterRegistry

from registry_helpers import replace_while_reading


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


def test_a_concurrent_reader_never_sees_a_missing_or_partial_concept(tiny_pipe, tmp_path):
    """Local registry: while a writer replaces a concept 4 times, a reader listing, fetching and fully
    verifying it (every file's sha256, the weights) always gets one complete published version."""
    root = tmp_path / "store"
    folders = [_adapter(tiny_pipe, tmp_path / f"v{i}", "live", 40 + i) for i in range(5)]

    def check(reader, published) -> str:
        listed = [m.concept_id for m in reader.list()]
        version, manifest = reader.current("live")
        folder = reader.fetch("live", tmp_path / "reader-cache")       # the current one, in place
        checked = reader.verify("live", folder.name)                   # hashes + weights of what fetch gave
        if "live" not in listed or folder.name not in published | {version} \
                or not (folder / DIFFUSERS_WEIGHTS).is_file() or set(checked.files) != set(manifest.files):
            why = [(e.concept_id, e.reason) for e in reader.scan()]
            return f"problem: listed {listed} (scan: {why}), current {version}, fetched {folder.name}"
        return folder.name

    problems, seen, published = replace_while_reading(root, "live", folders, check)
    assert problems == [], problems[:5]
    assert seen and set(seen) <= published and len(published) == 5
    assert AdapterRegistry(root).versions("live") == sorted(published)     # every version stays, none moved


def test_a_crash_before_the_pointer_write_keeps_the_old_version_served(tiny_pipe, tmp_path, monkeypatch):
    """The new version's files are written, then the process dies before ``current.json`` is replaced:
    readers keep the old version, intact; a retried publish (same files, same version) completes."""
    reg = AdapterRegistry(tmp_path / "store")
    reg.publish("zig", _adapter(tiny_pipe, tmp_path / "a", "zig", 0), owner="ann")
    old_version, old_manifest = reg.current("zig")
    old_pointer = (tmp_path / "store" / "adapters" / "zig" / POINTER).read_bytes()
    old_weights = (reg.fetch("zig", tmp_path / "cache") / DIFFUSERS_WEIGHTS).read_bytes()
    new_folder = _adapter(tiny_pipe, tmp_path / "b", "zig", 1)
    real_write = AdapterRegistry._write
    written = []

    def crash_at_pointer(self, path, data):
        if path.endswith(f"/{POINTER}"):
            raise OSError("simulated crash before the pointer write")
        written.append(path.rsplit("/", 1)[-1])
        real_write(self, path, data)

    monkeypatch.setattr(AdapterRegistry, "_write", crash_at_pointer)
    with pytest.raises(OSError, match="simulated crash"):
        reg.publish("zig", new_folder, owner="ann")
    monkeypatch.setattr(AdapterRegistry, "_write", real_write)
    new_version = next(v for v in reg.versions("zig") if v != old_version)
    assert written[-1] == "purecc_adapter.json"                   # the new version was written whole
    reader = AdapterRegistry(tmp_path / "store")                  # a fresh reader (another process)
    assert (tmp_path / "store" / "adapters" / "zig" / POINTER).read_bytes() == old_pointer
    assert reader.current("zig") == (old_version, old_manifest)
    assert [m.concept_id for m in reader.list()] == ["zig"] and reader.owner("zig") == "ann"
    fetched = reader.fetch("zig", tmp_path / "cache2")
    assert fetched.name == old_version and (fetched / DIFFUSERS_WEIGHTS).read_bytes() == old_weights
    assert reader.verify("zig", old_version).files == old_manifest.files      # old version intact
    assert not [p.name for p in (tmp_path / "store" / "adapters" / "zig").iterdir() if p.name.startswith(".")]
    # the publish retried after the crash: same content, same version; the pointer flips now
    assert reg.publish("zig", new_folder, owner="ann").endswith(f"/zig/{new_version}")
    assert reader.current("zig")[0] == new_version and reader.versions("zig") == sorted([old_version, new_version])
    assert reader.verify("zig", old_version).files == old_manifest.files


def test_recipe_round_trip_and_validation():
    r = stage_recipe(2, steps=5, lambda_mode="adaptive")
    assert StageRecipe.from_dict(r.to_dict()) == r
    assert StageRecipe.from_dict({**r.to_dict(), "betas": [0.9, 0.99]}).betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="lambda_mode='sometimes'"):
        stage_recipe(2, lambda_mode="sometimes")
    assert (stage_recipe(1).lr, stage_recipe(1).steps, stage_recipe(1).grad_accum) == (4e-4, 1000, 4)
    assert (stage_recipe(2).lr, stage_recipe(2).steps, stage_recipe(2).eta) == (4e-4, 800, 0.1)
