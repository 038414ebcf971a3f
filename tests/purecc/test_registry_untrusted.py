"""The registry trusts nothing it reads: every kind of bad entry gets its own named error, is
reported by ``scan()`` with its reason, is left out of ``list()``, and never breaks the listing.

Each case starts from a correctly published concept and damages its current version folder the
way an attacker or a careless tool would; where the damage is in a file, the manifest's sha256 is
rewritten to match, so that it is the check named in the case that must catch it.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from purecc import adapter_files as af
from purecc.adapter_files import (DIFFUSERS_WEIGHTS, MANIFEST, POINTER, AdapterManifest, export_slot, load_flat)
from purecc.bank import attach_bank
from purecc.fileio import sha256_bytes
from purecc.model import base_fingerprint, load_pipeline
from purecc.registry import AdapterRegistry, NotOwner

GOOD = ("alpha", "omega")


@pytest.fixture(scope="module")
def bank_fp(tiny_model_dir):
    tr = load_pipeline(str(tiny_model_dir)).transformer
    return attach_bank(tr, 1), base_fingerprint(tr)


def write_adapter(bank, fp, dest: Path, cid: str, seed: int, trigger: str = "sks") -> Path:
    flat = torch.randn(bank.params_per_slot, generator=torch.Generator().manual_seed(seed)) * 0.1
    return export_slot(bank, flat, dest, AdapterManifest(cid, trigger, 2, 3, bank.rank, bank.alpha, [], fp))


@pytest.fixture()
def reg(bank_fp, tmp_path) -> AdapterRegistry:
    bank, fp = bank_fp
    reg = AdapterRegistry(tmp_path / "store")
    for i, cid in enumerate(GOOD + ("bad",)):
        reg.publish(cid, write_adapter(bank, fp, tmp_path / "staging" / cid, cid, seed=i))
    return reg


def version_dir(reg: AdapterRegistry, cid: str) -> Path:
    return Path(reg.path_of(cid))


def edit_manifest(reg: AdapterRegistry, cid: str, **changes) -> None:
    path = version_dir(reg, cid) / MANIFEST
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def replace_file(reg: AdapterRegistry, cid: str, name: str, data: bytes) -> None:
    """Swap a file for ``data`` and make the manifest's sha256 match it again."""
    (version_dir(reg, cid) / name).write_bytes(data)
    m = json.loads((version_dir(reg, cid) / MANIFEST).read_text())
    edit_manifest(reg, cid, files={**m["files"], name: sha256_bytes(data)})


def weights(reg: AdapterRegistry, cid: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load((version_dir(reg, cid) / DIFFUSERS_WEIGHTS).read_bytes())


def assert_listing_survives(reg: AdapterRegistry, error: type, match: str, tmp_path: Path, *,
                            deep: bool = False) -> str:
    """The bad entry is reported with ``error``'s message; the good ones still list and load.

    ``deep``: damage only a full check finds (hashes, tensors): ``scan(verify=True)`` reports it,
    while ``list()`` (which reads no weights) may still name the concept; loading it is refused.
    """
    entries = {e.concept_id: e for e in reg.scan(verify=True)}
    bad = entries["bad"]
    assert not bad.servable and bad.manifest is None
    listed = [m.concept_id for m in reg.list()]
    assert listed == (sorted(GOOD + ("bad",)) if deep else list(GOOD))
    assert {e.concept_id for e in reg.scan() if e.servable} == set(listed)
    assert all(entries[c].servable for c in GOOD)
    assert match in bad.reason, bad.reason
    assert str(tmp_path) not in bad.reason                    # never a server path
    return bad.reason


def assert_load_refused(reg, bank_fp, error: type, match: str, tmp_path: Path) -> None:
    bank, fp = bank_fp
    with pytest.raises(error, match=match) as info:
        load_flat(bank, reg.fetch("bad", tmp_path / "cache"), base_fingerprint=fp, concept_id="bad")
    assert str(tmp_path) not in str(info.value)
    for cid in GOOD:
        load_flat(bank, reg.fetch(cid, tmp_path / "cache"), base_fingerprint=fp, concept_id=cid)


# ----- manifests ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/file.json", "..", ".hidden",
                                  "a\\b", ""])
def test_manifest_file_names_must_be_plain_names(reg, tmp_path, name):
    (tmp_path / "outside").write_text("a server file")
    m = json.loads((version_dir(reg, "bad") / MANIFEST).read_text())
    edit_manifest(reg, "bad", files={**m["files"], name: sha256_bytes(b"a server file")})
    with pytest.raises(af.ManifestInvalid, match="not a plain file name"):
        reg.current("bad")
    assert_listing_survives(reg, af.ManifestInvalid, "not a plain file name", tmp_path)


def test_malformed_manifest_json(reg, tmp_path):
    (version_dir(reg, "bad") / MANIFEST).write_text('{"concept_id": "bad", ')
    with pytest.raises(af.ManifestInvalid, match="not valid JSON"):
        reg.current("bad")
    assert_listing_survives(reg, af.ManifestInvalid, "not valid JSON", tmp_path)
    (version_dir(reg, "bad") / MANIFEST).write_text('["a list"]')
    assert_listing_survives(reg, af.ManifestInvalid, "not a JSON object", tmp_path)
    (version_dir(reg, "bad") / MANIFEST).write_bytes(b'{"concept_id": "\xff\xfe"}')
    assert_listing_survives(reg, af.ManifestInvalid, "not valid JSON", tmp_path)


def test_manifest_concept_id_must_match_its_folder(reg, tmp_path):
    edit_manifest(reg, "bad", concept_id="alpha")          # claims to be another concept
    with pytest.raises(af.ConceptIdMismatch, match="names concept 'alpha', not 'bad'"):
        reg.current("bad")
    assert_listing_survives(reg, af.ConceptIdMismatch, "names concept 'alpha'", tmp_path)


@pytest.mark.parametrize("changes, match", [
    ({"trigger": "x" * 65}, "trigger"), ({"trigger": "a\nb"}, "trigger"), ({"rank": 0}, "rank"),
    ({"rank": 10**9}, "rank"), ({"alpha": -1}, "alpha"), ({"targets": ["../x y"]}, "targets"),
    ({"files": {}}, "must list pytorch_lora_weights.safetensors"), ({"stage": "two"}, "stage"),
    ({"files": {DIFFUSERS_WEIGHTS: "not-a-hash"}}, "64 lowercase hex"), ({"format_version": 99}, "format_version"),
])
def test_manifest_fields_are_bounded(reg, tmp_path, changes, match):
    edit_manifest(reg, "bad", **changes)
    with pytest.raises(af.ManifestInvalid, match=match):
        reg.current("bad")
    assert_listing_survives(reg, af.ManifestInvalid, match, tmp_path)


def test_oversized_manifest(reg, tmp_path):
    edit_manifest(reg, "bad", metrics={"pad": "x" * (af.MAX_MANIFEST_BYTES + 1)})
    with pytest.raises(af.FileTooLarge, match="larger than"):
        reg.current("bad")
    assert_listing_survives(reg, af.FileTooLarge, "larger than", tmp_path)


def test_bad_pointer_and_missing_version(reg, tmp_path):
    pointer = Path(reg.concept_path("bad")) / POINTER
    good = pointer.read_text()
    pointer.write_text("{oops")
    assert_listing_survives(reg, af.ManifestInvalid, "current.json is not valid JSON", tmp_path)
    pointer.write_text(json.dumps({**json.loads(good), "version": "../../alpha"}))
    assert_listing_survives(reg, af.ManifestInvalid, "version", tmp_path)
    pointer.write_text(json.dumps({**json.loads(good), "version": "0" * 32}))
    assert_listing_survives(reg, af.FileMissing, "is missing", tmp_path)


def test_invalid_folder_names_are_reported_not_served(reg, tmp_path):
    (Path(reg.adapters) / "Not A Concept").mkdir()
    entries = {e.concept_id: e for e in reg.scan()}
    assert entries["Not A Concept"].reason == "not a valid concept id"
    assert [m.concept_id for m in reg.list()] == sorted(GOOD + ("bad",))


# ----- files ----------------------------------------------------------------------------------
def test_symlinked_files_and_folders_are_never_followed(reg, tmp_path, bank_fp):
    target = tmp_path / "elsewhere.safetensors"
    target.write_bytes((version_dir(reg, "bad") / DIFFUSERS_WEIGHTS).read_bytes())   # same bytes, same hash
    (version_dir(reg, "bad") / DIFFUSERS_WEIGHTS).unlink()
    os.symlink(target, version_dir(reg, "bad") / DIFFUSERS_WEIGHTS)
    with pytest.raises(af.UnsafeFile, match="not a regular file"):
        reg.current("bad")
    assert_listing_survives(reg, af.UnsafeFile, "not a regular file", tmp_path)
    with pytest.raises(af.UnsafeFile, match="symlink"):
        load_flat(bank_fp[0], version_dir(reg, "bad"), concept_id="bad")
    # a whole concept folder that is a symlink to another one
    os.symlink(reg.concept_path("alpha"), Path(reg.adapters) / "linked")
    entries = {e.concept_id: e for e in reg.scan()}
    assert "not a folder" in entries["linked"].reason


def test_pickle_under_a_safetensors_name_is_never_unpickled(reg, tmp_path, bank_fp):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    replace_file(reg, "bad", DIFFUSERS_WEIGHTS, pickle.dumps(Boom(), protocol=2))
    assert_load_refused(reg, bank_fp, af.NotSafetensors, "is a pickle, not safetensors", tmp_path)
    assert_listing_survives(reg, af.NotSafetensors, "is a pickle", tmp_path, deep=True)
    assert not (tmp_path / "pwned").exists()
    torch.save({"w": torch.zeros(2)}, tmp_path / "zipped.pt")           # torch.save's zip format
    replace_file(reg, "bad", DIFFUSERS_WEIGHTS, (tmp_path / "zipped.pt").read_bytes())
    assert_load_refused(reg, bank_fp, af.NotSafetensors, "zip archive", tmp_path)


def test_truncated_safetensors(reg, tmp_path, bank_fp):
    data = (version_dir(reg, "bad") / DIFFUSERS_WEIGHTS).read_bytes()
    for cut in (data[:5], data[:100], data[:-7]):
        replace_file(reg, "bad", DIFFUSERS_WEIGHTS, cut)
        assert_load_refused(reg, bank_fp, af.TruncatedFile, "truncated|data block|past the end", tmp_path)
    assert_listing_survives(reg, af.TruncatedFile, "safetensors", tmp_path, deep=True)


def test_huge_or_malformed_safetensors_header(reg, tmp_path, bank_fp):
    replace_file(reg, "bad", DIFFUSERS_WEIGHTS, struct.pack("<Q", 1 << 40) + b"{}")
    assert_load_refused(reg, bank_fp, af.HeaderInvalid, "exceeds", tmp_path)
    header = b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4000]}}'
    replace_file(reg, "bad", DIFFUSERS_WEIGHTS, struct.pack("<Q", len(header)) + header + b"\0" * 16)
    assert_load_refused(reg, bank_fp, af.TruncatedFile, "past the end", tmp_path)
    header = b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    replace_file(reg, "bad", DIFFUSERS_WEIGHTS, struct.pack("<Q", len(header)) + header + b"\0" * 8)
    assert_load_refused(reg, bank_fp, af.HeaderInvalid, "do not match its shape", tmp_path)
    header = b'{not json'
    replace_file(reg, "bad", DIFFUSERS_WEIGHTS, struct.pack("<Q", len(header)) + header)
    assert_load_refused(reg, bank_fp, af.HeaderInvalid, "not valid JSON", tmp_path)
    assert_listing_survives(reg, af.HeaderInvalid, "header", tmp_path, deep=True)


def test_wrong_dtypes_shapes_or_extra_tensors(reg, tmp_path, bank_fp):
    w = weights(reg, "bad")
    first = sorted(w)[0]
    cases = [({**w, first: w[first].to(torch.int32)}, "dtype 'I32'"),
             ({**w, first: w[first].t().contiguous()}, "has shape"),
             ({**w, "transformer.extra.lora_A.weight": torch.zeros(2, 2)}, "unexpected tensors"),
             ({k: v for k, v in w.items() if k != first}, "missing")]
    for tensors, match in cases:
        replace_file(reg, "bad", DIFFUSERS_WEIGHTS, save(tensors))
        assert_load_refused(reg, bank_fp, af.TensorMismatch, match, tmp_path)


def test_hash_mismatch(reg, tmp_path, bank_fp):
    path = version_dir(reg, "bad") / DIFFUSERS_WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))                       # the manifest is left as it was
    assert_load_refused(reg, bank_fp, af.HashMismatch, "sha256 of pytorch_lora_weights", tmp_path)
    assert_listing_survives(reg, af.HashMismatch, "sha256", tmp_path, deep=True)


def test_non_finite_weights_are_refused_on_load_and_publish(reg, tmp_path, bank_fp):
    w = weights(reg, "bad")
    first = sorted(w)[0]
    w[first][0, 0] = float("nan")
    replace_file(reg, "bad", DIFFUSERS_WEIGHTS, save(w))
    assert_load_refused(reg, bank_fp, af.NonFiniteAdapter, "not finite", tmp_path)
    assert_listing_survives(reg, af.NonFiniteAdapter, "not finite", tmp_path, deep=True)
    import shutil

    staged = tmp_path / "alpha-nan"
    shutil.copytree(version_dir(reg, "alpha"), staged)
    w = weights(reg, "alpha")
    w[first][0, 0] = float("inf")
    (staged / DIFFUSERS_WEIGHTS).write_bytes(save(w))
    m = json.loads((staged / MANIFEST).read_text())
    m["files"][DIFFUSERS_WEIGHTS] = sha256_bytes((staged / DIFFUSERS_WEIGHTS).read_bytes())
    (staged / MANIFEST).write_text(json.dumps(m))
    before = reg.current("alpha")
    with pytest.raises(af.NonFiniteAdapter, match="not finite"):
        reg.publish("alpha", staged)                        # correctly hashed, still refused
    assert reg.current("alpha") == before and len(reg.versions("alpha")) == 1


def test_oversized_files_are_refused(reg, tmp_path, monkeypatch):
    monkeypatch.setattr(af, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(af.FileTooLarge, match="larger than 1000"):
        reg.current("bad")


# ----- publishing -------------------------------------------------------------------------------
def test_publish_refuses_unsafe_folders(reg, tmp_path, bank_fp):
    bank, fp = bank_fp
    folder = write_adapter(bank, fp, tmp_path / "linky", "bad", seed=9)
    os.symlink("/etc/hostname", folder / "notes.txt")
    with pytest.raises(af.UnsafeFile, match="symlink"):
        reg.publish("bad", folder)
    other = write_adapter(bank, fp, tmp_path / "other", "alpha", seed=9)
    with pytest.raises(af.ConceptIdMismatch):
        reg.publish("bad", other)                          # a folder made for another concept


def test_owner_is_recorded_and_enforced(reg, tmp_path, bank_fp):
    bank, fp = bank_fp
    assert reg.owner("alpha") is None
    reg.publish("mine", write_adapter(bank, fp, tmp_path / "m1", "mine", seed=20), owner="ann")
    assert reg.owner("mine") == "ann"
    with pytest.raises(NotOwner, match="owned by another owner"):
        reg.publish("mine", write_adapter(bank, fp, tmp_path / "m2", "mine", seed=21), owner="bob")
    version, _ = reg.current("mine")
    reg.publish("mine", write_adapter(bank, fp, tmp_path / "m3", "mine", seed=22))   # internal caller
    assert reg.owner("mine") == "ann" and reg.current("mine")[0] != version


def test_flat_layout_is_read_and_migrated(bank_fp, tmp_path):
    bank, fp = bank_fp
    reg = AdapterRegistry(tmp_path / "store")
    flat_dir = Path(reg.adapters) / "old"
    write_adapter(bank, fp, flat_dir, "old", seed=30)         # the pre-versioned layout
    version, manifest = reg.current("old")
    assert version.startswith("flat-") and manifest.concept_id == "old"
    assert [m.concept_id for m in reg.list()] == ["old"]
    load_flat(bank, reg.fetch("old", tmp_path / "cache"), base_fingerprint=fp, concept_id="old")
    new = reg.publish("old", write_adapter(bank, fp, tmp_path / "new", "old", seed=31))
    assert reg.current("old")[0] == Path(new).name and Path(reg.path_of("old")) == Path(new)
    assert reg.versions("old") == [Path(new).name]


def test_a_concept_folder_reads_as_its_current_version(reg, bank_fp, tmp_path):
    """``<root>/adapters/<id>`` (what the ledger records, what ``purecc generate --concept`` gets)."""
    bank, fp = bank_fp
    concept = reg.concept_path("alpha")
    assert af.read_adapter_manifest(concept).files == reg.current("alpha")[1].files
    _, flat = load_flat(bank, concept, base_fingerprint=fp)
    _, same = load_flat(bank, reg.path_of("alpha"), base_fingerprint=fp)
    assert torch.equal(flat, same)
    (Path(concept) / POINTER).write_text('{"version": "../../../etc"}')
    with pytest.raises(af.ManifestInvalid, match="current.json"):
        af.read_adapter_manifest(concept)


# ----- validation images ----------------------------------------------------------------------
def test_validation_images_are_listed_with_prompts_and_read_only_as_plain_pngs(bank_fp, tmp_path):
    from PIL import Image

    from purecc.registry import MAX_VALIDATION_IMAGES

    bank, fp = bank_fp
    reg = AdapterRegistry(tmp_path / "store")
    staging = write_adapter(bank, fp, tmp_path / "staging" / "val", "val", seed=3)
    for stage, n in ((1, 2), (2, MAX_VALIDATION_IMAGES + 3)):
        folder = staging / "validation" / f"stage{stage}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i, stage, 0)).save(folder / f"{i:02d}.png")
    (staging / "validation" / "stage1" / "prompts.json").write_text(json.dumps({"prompts": ["a sks", 7]}))
    (staging / "validation" / "stage2" / "notes.txt").write_text("not an image")
    reg.publish("val", staging)
    listed = reg.validation_images("val")
    assert listed[1] == [("00.png", "a sks"), ("01.png", None)]               # a non-string prompt: none
    assert len(listed[2]) == MAX_VALIDATION_IMAGES and all(p is None for _, p in listed[2])
    png = reg.validation_image("val", 1, "01.png")
    assert png.startswith(b"\x89PNG") and Image.open(__import__("io").BytesIO(png)).getpixel((0, 0)) == (1, 1, 0)
    for stage, name, error in ((1, "../../purecc_adapter.json", af.UnsafeFile), (1, "prompts.json", af.UnsafeFile),
                               (1, "02.png", af.FileMissing)):
        with pytest.raises(error) as info:
            reg.validation_image("val", stage, name)
        assert str(tmp_path) not in str(info.value)
    with pytest.raises(ValueError, match="stage"):
        reg.validation_image("val", 3, "00.png")
    with pytest.raises(KeyError):
        reg.validation_images("nope")
    # bytes that are not a PNG, a symlinked image and a symlinked folder are refused, never followed
    folder = version_dir(reg, "val") / "validation"
    (folder / "stage1" / "00.png").write_bytes(b"GIF89a" + b"\0" * 32)
    with pytest.raises(af.UnsafeFile, match="not a PNG"):
        reg.validation_image("val", 1, "00.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    (folder / "stage1" / "01.png").unlink()
    os.symlink(secret, folder / "stage1" / "01.png")
    with pytest.raises(af.UnsafeFile):
        reg.validation_image("val", 1, "01.png")
    assert [n for n, _ in reg.validation_images("val")[1]] == ["00.png"]    # the link is not listed
    os.rename(folder / "stage2", tmp_path / "moved")
    os.symlink(tmp_path / "moved", folder / "stage2")
    assert 2 not in reg.validation_images("val")
    with pytest.raises(af.FileMissing):
        reg.validation_image("val", 2, "00.png")
    # a concept published without validation images has none
    reg.publish("plain", write_adapter(bank, fp, tmp_path / "staging" / "plain", "plain", seed=4))
    assert reg.validation_images("plain") == {}


@pytest.mark.parametrize("header_bytes", [128, 0x0280, 0x4B50])
def test_a_safetensors_file_whose_length_bytes_look_like_a_pickle_or_zip_is_read(header_bytes):
    """A header of 128 bytes starts the file with 80 00 (a pickle's first byte), one of 0x4b50 with
    "PK" (a zip's): those are ordinary safetensors files and must load."""
    text = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    text += b" " * (header_bytes - len(text))
    data = struct.pack("<Q", header_bytes) + text + struct.pack("<f", 1.5)
    assert data[:1] == b"\x80" or data[:2] == b"PK"
    assert af.check_safetensors(data, label="adapter c", name="x.safetensors") == {"x": ("F32", (1,))}
