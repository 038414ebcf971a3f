"""Standard adapter files for one bank slot, and a strict reader that trusts none of them.

A concept folder holds:
  adapter_config.json + adapter_model.safetensors   PEFT format: ``PeftModel.from_pretrained(transformer, dir)``
  pytorch_lora_weights.safetensors                  diffusers format: ``pipe.load_lora_weights(dir)``
  purecc_embeddings.safetensors                     the concept's embeddings, when its recipe learns them:
                                                    "layerwise": one tensor ``layerwise`` (blocks, dim),
                                                    added to the text stream at the trigger's tokens at the
                                                    input of each block; "clip-token": ``clip_l`` (dim_l,)
                                                    and ``clip_g`` (dim_g,), added to CLIP-L's and CLIP-G's
                                                    input embeddings at the trigger's tokens
                                                    (``purecc.concept_embeddings``)
  purecc_adapter.json                               our manifest: id, trigger, stage, steps, rank, targets,
                                                    embeddings form, base fingerprint, sha256 of every
                                                    weight file, metrics
Weights are safetensors only; every file is written atomically.

Reading trusts nothing: the manifest is validated by a pydantic model (its concept id must be the
one asked for, its file names plain names, its trigger and numbers bounded); every listed file is
opened without following symlinks, bounded in size, read once into memory, checked against its
sha256 and parsed from those same bytes (so a file swapped after the check is never parsed). A
safetensors file is checked by hand before the library parses it: the format is a little-endian
u64 header length, a JSON header and a data block, and checking it first is what lets a pickle,
a truncated file or a huge header get its own named error instead of whatever the parser says.
Every failure is an ``AdapterFileError`` subclass whose message names the concept and the file,
never a server path.

A registry concept folder (``adapters/<id>/`` holding ``current.json``, see ``purecc.registry``)
can be given wherever an adapter folder is read: its current version is read.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load

from .bank import AdapterBank
from .concept_embeddings import CLIP_KEYS
from .fileio import atomic_save_tensors, atomic_write_json, sha256_bytes, sha256_file
from .ids import CONCEPT_ID_PATTERN, validate_concept_id

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
MANIFEST = "purecc_adapter.json"
EMBEDDINGS = "purecc_embeddings.safetensors"
EMBEDDINGS_KEY = "layerwise"
POINTER = "current.json"                 # a registry concept folder's pointer to its current version
FORMAT_VERSION = 1

FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"   # a plain name: no '/', no leading '.', no '..'
VERSION_PATTERN = r"^[0-9a-f]{32}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_MANIFEST_BYTES = 4 << 20
MAX_JSON_FILE_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 2 << 30
MAX_HEADER_BYTES = 16 << 20
MAX_LISTED_FILES = 16
MAX_TRIGGER_CHARS = 64
TENSOR_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


class AdapterFileError(ValueError):
    """An adapter folder that is incomplete, tampered with, malformed, or made for another base."""


class ManifestMissing(AdapterFileError):
    """No manifest: an incomplete folder, or not a purecc adapter."""


class ManifestInvalid(AdapterFileError):
    """The manifest is not valid JSON or breaks the manifest schema."""


class ConceptIdMismatch(ManifestInvalid):
    """The manifest names another concept than the folder it was read from."""


class UnsafeFile(AdapterFileError):
    """A name that is not a plain file name, a symlink, or something other than a regular file."""


class FileTooLarge(AdapterFileError):
    """A file larger than its kind may be."""


class FileMissing(AdapterFileError):
    """A file the manifest lists is not there."""


class HashMismatch(AdapterFileError):
    """A file's sha256 differs from the one its manifest records."""


class NotSafetensors(AdapterFileError):
    """A weights file that is not safetensors (a pickle, a zip archive): refused, never parsed."""


class TruncatedFile(AdapterFileError):
    """A safetensors file shorter than its header says."""


class HeaderInvalid(AdapterFileError):
    """A safetensors header that is too large, not JSON, or describes impossible tensors."""


class TensorMismatch(AdapterFileError):
    """Tensors other than the ones this bank expects: names, dtypes or shapes."""


class BaseMismatch(AdapterFileError):
    """An adapter trained on another base model or with another rank."""


class NonFiniteAdapter(AdapterFileError):
    """Adapter weights holding NaN or Inf: never written, never published, never loaded into a slot."""


def check_finite(flat: torch.Tensor, what: str) -> None:
    """Raise ``NonFiniteAdapter`` naming ``what`` when ``flat`` holds a NaN or an Inf."""
    bad = int((~torch.isfinite(flat)).sum())
    if bad:
        raise NonFiniteAdapter(f"{what}: {bad} of {flat.numel()} weights are not finite (NaN or Inf)")


@dataclass
class AdapterManifest:
    """The contents of ``purecc_adapter.json``: what the adapter is, what it was trained on, its files' sha256."""

    concept_id: str
    trigger: str
    stage: int
    steps: int
    rank: int
    alpha: float
    targets: list[str]
    base_fingerprint: str
    files: dict[str, str] = field(default_factory=dict)      # file name -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)
    max_sequence_length: int = 77            # T5 tokens training encoded prompts with (serving matches it)
    mixed_precision: str = "auto"            # the recipe's autocast setting in training
    embeddings: str = "none"                 # "layerwise" / "clip-token": the folder holds EMBEDDINGS
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, data: dict) -> "AdapterManifest":
        """Build from parsed JSON, validated by ``ManifestSchema`` (``ManifestInvalid`` if it breaks it)."""
        return _validated_manifest(data, label="adapter")

    @property
    def served_version(self) -> str:
        """What a server loads, as one hash: it changes exactly when a loaded concept would change.

        A LoRA-only concept is its diffusers weights, so this is their sha256. A concept with
        embeddings is also its embeddings file and the trigger that places them, so this is the
        sha256 of those three together; republishing new embeddings beside the same LoRA is a
        new served version, and a server never keeps the old embeddings under it.
        """
        weights = self.files.get(DIFFUSERS_WEIGHTS, "")
        if self.embeddings == "none":
            return weights
        parts = (weights, self.embeddings, self.files.get(EMBEDDINGS, ""), self.trigger)
        return sha256_bytes("\n".join(parts).encode())


class ManifestSchema(BaseModel):
    """What a manifest may hold; keys this version does not know are ignored."""

    model_config = ConfigDict(extra="ignore", strict=False)

    concept_id: str = Field(pattern=CONCEPT_ID_PATTERN)
    trigger: str = Field(min_length=1, max_length=MAX_TRIGGER_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$")
    stage: int = Field(ge=0, le=2)
    steps: int = Field(ge=0, le=10_000_000)
    rank: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    targets: list[str] = Field(max_length=4096)
    base_fingerprint: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    files: dict[str, str] = Field(default_factory=dict, max_length=MAX_LISTED_FILES)
    metrics: dict[str, Any] = Field(default_factory=dict)
    max_sequence_length: int = Field(77, ge=1, le=4096)
    mixed_precision: str = Field("auto", max_length=16)
    embeddings: Literal["none", "layerwise", "clip-token"] = "none"
    created: float = Field(default_factory=time.time, allow_inf_nan=False)
    format_version: int = Field(FORMAT_VERSION, ge=1, le=FORMAT_VERSION)

    def problems(self) -> list[str]:
        """Checks across fields that pydantic's per-field constraints do not express."""
        out = []
        for name, digest in self.files.items():
            if not _plain_name(name):
                out.append(f"files: {name[:80]!r} is not a plain file name ({FILE_NAME_PATTERN})")
            elif not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                out.append(f"files: the sha256 of {name} is not 64 lowercase hex digits")
        if DIFFUSERS_WEIGHTS not in self.files:
            out.append(f"files: must list {DIFFUSERS_WEIGHTS}")
        if (self.embeddings != "none") != (EMBEDDINGS in self.files):
            out.append(f"files: {EMBEDDINGS} must be listed exactly when embeddings is not 'none'")
        for t in self.targets[:8]:
            if not (0 < len(t) <= 256 and all(c.isalnum() or c in "._" for c in t)):
                out.append(f"targets: {t[:80]!r} is not a module name")
        return out


class RegistryPointer(BaseModel):
    """``adapters/<id>/current.json``: the version a registry serves for one concept, and its owner."""

    model_config = ConfigDict(extra="ignore")

    format: int = Field(FORMAT_VERSION, ge=1, le=FORMAT_VERSION)
    concept_id: str = Field(pattern=CONCEPT_ID_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    owner: Optional[str] = Field(None, min_length=1, max_length=128)
    published: float = Field(allow_inf_nan=False)
    previous: Optional[str] = Field(None, pattern=VERSION_PATTERN)


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and re.fullmatch(FILE_NAME_PATTERN, name) is not None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, what: str, error: type[AdapterFileError] = ManifestInvalid) -> Any:
    """JSON from bytes, refusing NaN/Infinity and bad UTF-8; ``error`` names ``what`` on failure."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:      # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise error(f"{what} is not valid JSON ({reason})") from None


def _schema_errors(exc: ValidationError) -> str:
    """pydantic's errors as 'field: message', without the offending input (it may be huge or hostile)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors()[:4])


def _validated_manifest(raw: Any, *, label: str, expected_id: str | None = None) -> AdapterManifest:
    if not isinstance(raw, dict):
        raise ManifestInvalid(f"{label}: {MANIFEST} is not a JSON object")
    try:
        m = ManifestSchema.model_validate(raw)
    except ValidationError as exc:
        raise ManifestInvalid(f"{label}: {MANIFEST}: {_schema_errors(exc)}") from None
    problems = m.problems()
    if problems:
        raise ManifestInvalid(f"{label}: {MANIFEST}: {'; '.join(problems[:4])}")
    if expected_id is not None and m.concept_id != expected_id:
        raise ConceptIdMismatch(f"{label}: {MANIFEST} names concept {m.concept_id!r}, not {expected_id!r}")
    return AdapterManifest(**m.model_dump())


def parse_manifest(data: bytes, *, label: str, expected_id: str | None = None) -> AdapterManifest:
    """A manifest from its bytes: bounded, valid JSON, valid schema, the expected concept id."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise FileTooLarge(f"{label}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    return _validated_manifest(parse_json(data, f"{label}: {MANIFEST}"), label=label, expected_id=expected_id)


def parse_pointer(data: bytes, *, label: str, expected_id: str) -> RegistryPointer:
    """A registry pointer from its bytes (``ManifestInvalid`` when malformed or naming another concept)."""
    if len(data) > MAX_JSON_FILE_BYTES:
        raise FileTooLarge(f"{label}: {POINTER} is larger than {MAX_JSON_FILE_BYTES} bytes")
    raw = parse_json(data, f"{label}: {POINTER}")
    try:
        ptr = RegistryPointer.model_validate(raw)
    except ValidationError as exc:
        raise ManifestInvalid(f"{label}: {POINTER}: {_schema_errors(exc)}") from None
    if ptr.concept_id != expected_id:
        raise ConceptIdMismatch(f"{label}: {POINTER} names concept {ptr.concept_id!r}, not {expected_id!r}")
    return ptr


# ----- safetensors, checked before parsing ----------------------------------------------------------
def check_safetensors(data: bytes, *, label: str, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a safetensors file holds, {key: (dtype, shape)}, after checking its layout by hand."""
    where = f"{label}: {name}"
    # a pickle starts with 0x80 and a zip with "PK", but so does a safetensors file whose header length
    # ends in those bytes (a 128-byte header is 80 00 00 ...): only a file whose first 8 bytes are not
    # followed by a JSON header of that length is named a pickle or a zip
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    looks_safetensors = 0 <= n <= MAX_HEADER_BYTES and data[8:8 + n].lstrip()[:1] == b"{"
    if not looks_safetensors and (data[:1] == b"\x80" or data[:2] == b"PK"):
        kind = "a pickle" if data[:1] == b"\x80" else "a zip archive (torch.save)"
        raise NotSafetensors(f"{where} is {kind}, not safetensors; it is never unpickled")
    if len(data) < 8:
        raise TruncatedFile(f"{where} is truncated ({len(data)} bytes, shorter than a safetensors header)")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise HeaderInvalid(f"{where}: header of {n} bytes exceeds {MAX_HEADER_BYTES} bytes")
    if 8 + n > len(data):
        raise TruncatedFile(f"{where} is truncated (header of {n} bytes, file of {len(data)} bytes)")
    header_bytes = data[8:8 + n]
    if not header_bytes.lstrip()[:1] == b"{":
        raise NotSafetensors(f"{where} is not safetensors (no JSON header)")
    header = parse_json(header_bytes, f"{where}: header", HeaderInvalid)
    if not isinstance(header, dict):
        raise HeaderInvalid(f"{where}: header is not a JSON object")
    size = len(data) - 8 - n
    spans, tensors = [], {}
    for key, info in header.items():
        if key == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise HeaderInvalid(f"{where}: __metadata__ must map names to strings")
            continue
        tensors[key] = _check_entry(where, key, info, size)
        spans.append((info["data_offsets"][0], info["data_offsets"][1], key))
    pos = 0
    for start, end, key in sorted(spans):
        if start != pos:
            raise HeaderInvalid(f"{where}: tensor {key[:80]!r} overlaps another or leaves a gap")
        pos = end
    if pos != size:
        raise TruncatedFile(f"{where}: the data block is {size} bytes, its tensors need {pos}")
    return tensors


def _check_entry(where: str, key: str, info: Any, size: int) -> tuple[str, tuple[int, ...]]:
    if not isinstance(info, dict):
        raise HeaderInvalid(f"{where}: entry {key[:80]!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in TENSOR_DTYPES:
        raise TensorMismatch(f"{where}: tensor {key[:80]!r} has dtype {str(dtype)[:16]!r}, "
                             f"expected one of {sorted(TENSOR_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise HeaderInvalid(f"{where}: tensor {key[:80]!r} has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise HeaderInvalid(f"{where}: tensor {key[:80]!r} has invalid data_offsets")
    if offsets[1] > size:
        raise TruncatedFile(f"{where}: tensor {key[:80]!r} ends past the end of the file")
    if offsets[1] - offsets[0] != math.prod(shape) * TENSOR_DTYPES[dtype]:
        raise HeaderInvalid(f"{where}: tensor {key[:80]!r}: its bytes do not match its shape and dtype")
    return dtype, tuple(shape)


def expected_tensors(bank: AdapterBank) -> dict[str, tuple[int, ...]]:
    """The diffusers-format keys and shapes a folder for ``bank`` must hold, exactly."""
    out = {}
    for s in bank.specs:
        out[f"transformer.{s.name}.lora_A.weight"] = (bank.rank, s.in_features)
        out[f"transformer.{s.name}.lora_B.weight"] = (s.out_features, bank.rank)
    return out


def _check_expected(found: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, tuple[int, ...]],
                    where: str) -> None:
    extra = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if extra or missing:
        raise TensorMismatch(f"{where}: unexpected tensors {[k[:80] for k in extra[:3]]}, "
                             f"missing {[k[:80] for k in missing[:3]]}")
    for key, shape in expected.items():
        if found[key][1] != shape:
            raise TensorMismatch(f"{where}: {key} has shape {found[key][1]}, this bank expects {shape}")


# ----- local folders ---------------------------------------------------------------------------------
def read_regular_file(path: Path, limit: int, *, label: str, name: str) -> bytes:
    """A regular file's bytes, at most ``limit``; a symlink, FIFO or device is refused, never followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FileMissing(f"{label}: file {name} is missing") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise UnsafeFile(f"{label}: {name} is a symlink; adapter files are never followed") from None
        raise AdapterFileError(f"{label}: {name} cannot be read ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{label}: {name} is not a regular file")
        if st.st_size > limit:
            raise FileTooLarge(f"{label}: {name} is {st.st_size} bytes, larger than {limit}")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > limit:
                raise FileTooLarge(f"{label}: {name} is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def size_limit(name: str) -> int:
    """The largest a listed file may be: weights up to ``MAX_WEIGHTS_BYTES``, anything else 1 MiB."""
    return MAX_WEIGHTS_BYTES if name.endswith(".safetensors") else MAX_JSON_FILE_BYTES


def _label(folder: Path, expected_id: str | None) -> str:
    return f"adapter {expected_id or folder.name}"      # the concept or the folder's own name, never its path


def adapter_folder(folder: str | Path) -> Path:
    """``folder`` itself, or the current version's folder when it is a registry concept folder (its
    pointer wins over an old flat layout's files beside it)."""
    folder = Path(folder)
    if not (folder / POINTER).exists():
        return folder
    cid = validate_concept_id(folder.name, "adapter folder")
    ptr = parse_pointer(read_regular_file(folder / POINTER, MAX_JSON_FILE_BYTES, label=f"adapter {cid}",
                                          name=POINTER), label=f"adapter {cid}", expected_id=cid)
    return folder / ptr.version


def read_adapter_manifest(folder: str | Path, *, concept_id: str | None = None) -> AdapterManifest:
    """The validated manifest of an adapter folder (its concept id must be ``concept_id`` when given)."""
    folder = adapter_folder(folder)
    label = _label(folder, concept_id)
    if not (folder / MANIFEST).exists() and not (folder / MANIFEST).is_symlink():
        raise ManifestMissing(f"{label}: no {MANIFEST} (incomplete or not a purecc adapter)")
    data = read_regular_file(folder / MANIFEST, MAX_MANIFEST_BYTES, label=label, name=MANIFEST)
    return parse_manifest(data, label=label, expected_id=concept_id)


def read_listed_files(folder: Path, manifest: AdapterManifest, *, label: str) -> dict[str, bytes]:
    """Every file the manifest lists, read once (no symlinks, bounded) and checked against its sha256."""
    out = {}
    for name, digest in manifest.files.items():
        data = read_regular_file(folder / name, size_limit(name), label=label, name=name)
        if sha256_bytes(data) != digest:
            raise HashMismatch(f"{label}: sha256 of {name} does not match its manifest")
        out[name] = data
    return out


def verify_files(folder: Path, manifest: AdapterManifest) -> None:
    """Check every file the manifest lists is a bounded regular file matching its sha256."""
    read_listed_files(Path(folder), manifest, label=_label(Path(folder), manifest.concept_id))


def parse_weights(data: bytes, *, label: str, name: str,
                  expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file's bytes: layout checked first, then parsed, all finite."""
    found = check_safetensors(data, label=label, name=name)
    if expected is not None:
        _check_expected(found, expected, f"{label}: {name}")
    try:
        tensors = st_load(data)
    except Exception as exc:       # the layout passed our checks; anything the parser still refuses is named
        raise HeaderInvalid(f"{label}: {name} cannot be parsed as safetensors ({type(exc).__name__})") from None
    for key, t in tensors.items():
        check_finite(t.float().reshape(-1), f"{label}: {name}: {key}")
    return tensors


def check_publishable(files: dict[str, bytes], concept_id: str) -> AdapterManifest:
    """What ``purecc.registry`` checks in a folder's bytes before publishing them: the manifest (naming
    ``concept_id``), every listed file present with its sha256, safetensors layout, finite weights."""
    label = f"adapter {concept_id}"
    if MANIFEST not in files:
        raise ManifestMissing(f"{label}: no {MANIFEST} (incomplete or not a purecc adapter)")
    manifest = parse_manifest(files[MANIFEST], label=label, expected_id=concept_id)
    for name, digest in manifest.files.items():
        if name not in files:
            raise FileMissing(f"{label}: file {name} is missing")
        if sha256_bytes(files[name]) != digest:
            raise HashMismatch(f"{label}: sha256 of {name} does not match its manifest")
        if name.endswith(".safetensors"):
            parse_weights(files[name], label=label, name=name)
        elif name.endswith(".json"):
            parse_json(files[name], f"{label}: {name}")
    return manifest


# ----- writing ---------------------------------------------------------------------------------------
def _peft_config(bank: AdapterBank) -> dict:
    from peft import LoraConfig

    cfg = LoraConfig(r=bank.rank, lora_alpha=bank.alpha, lora_dropout=0.0, init_lora_weights="gaussian",
                     target_modules=[s.name for s in bank.specs])
    data = cfg.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


def export_slot(bank: AdapterBank, flat: torch.Tensor, dest: str | Path, manifest: AdapterManifest,
                emb: torch.Tensor | None = None) -> Path:
    """Write one concept's adapter (flat vector in ``bank``'s layout) as PEFT + diffusers files, and
    its embeddings when it has them: layer-wise (blocks, dim) or CLIP tokens (dim_l + dim_g,)."""
    validate_concept_id(manifest.concept_id)
    check_finite(flat, f"export {manifest.concept_id}")
    if emb is not None:
        check_finite(emb.reshape(-1), f"export {manifest.concept_id}: embeddings")
    dest = Path(dest)
    layers = bank.unflatten(flat.detach().float().cpu())
    peft_sd, diff_sd = {}, {}
    for name, (a, b) in layers.items():
        for key, t in (("lora_A", a), ("lora_B", b)):
            peft_sd[f"base_model.model.{name}.{key}.weight"] = t
            diff_sd[f"transformer.{name}.{key}.weight"] = t
    meta = {"format": "pt", "concept_id": manifest.concept_id}
    atomic_write_json(dest / PEFT_CONFIG, _peft_config(bank))
    atomic_save_tensors(dest / PEFT_WEIGHTS, peft_sd, meta)
    atomic_save_tensors(dest / DIFFUSERS_WEIGHTS, diff_sd, meta)
    manifest.rank, manifest.alpha = bank.rank, bank.alpha
    manifest.targets = [s.name for s in bank.specs]
    names = [PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_WEIGHTS]
    manifest.embeddings = "none"
    if emb is not None and emb.dim() == 1:          # CLIP tokens (dim_l + dim_g,)
        if bank.tokens is None:
            raise ValueError(f"export {manifest.concept_id}: CLIP token embeddings need a bank with token slots")
        parts = {k: v.detach().float().cpu().contiguous() for k, v in bank.tokens.split(emb).items()}
        atomic_save_tensors(dest / EMBEDDINGS, parts, {**meta, "trigger": manifest.trigger,
                                                       "where": "CLIP-L and CLIP-G input embeddings"})
        names.append(EMBEDDINGS)
        manifest.embeddings = "clip-token"
    elif emb is not None:
        atomic_save_tensors(dest / EMBEDDINGS, {EMBEDDINGS_KEY: emb.detach().float().cpu().contiguous()},
                            {**meta, "trigger": manifest.trigger, "stream": "context", "where": "block input"})
        names.append(EMBEDDINGS)
        manifest.embeddings = "layerwise"
    manifest.files = {f: sha256_file(dest / f) for f in names}
    atomic_write_json(dest / MANIFEST, asdict(manifest))  # written last: its presence marks completion
    return dest


# ----- loading ---------------------------------------------------------------------------------------
def load_adapter_layers(folder: str | Path, *, verify: bool = True, concept_id: str | None = None,
                        expected: dict[str, tuple[int, ...]] | None = None) -> tuple[AdapterManifest, dict]:
    """Read the diffusers-format weights -> ({layer: (A, B)}), after the manifest, hash and layout checks.

    ``verify=False`` skips only the sha256 comparison; the file is still bounded and checked.
    """
    folder = adapter_folder(folder)
    manifest = read_adapter_manifest(folder, concept_id=concept_id)
    return manifest, _read_layers(folder, manifest, verify=verify, expected=expected)


def _read_weight_files(folder: Path, manifest: AdapterManifest, *, verify: bool) -> dict[str, bytes]:
    """The weights files a bank reads (the diffusers file, the embeddings when listed), as bytes."""
    label = f"adapter {manifest.concept_id}"
    if verify:
        files = read_listed_files(folder, manifest, label=label)
        return {k: v for k, v in files.items() if k in (DIFFUSERS_WEIGHTS, EMBEDDINGS)}
    names = [DIFFUSERS_WEIGHTS] + ([EMBEDDINGS] if manifest.embeddings != "none" else [])
    return {n: read_regular_file(folder / n, MAX_WEIGHTS_BYTES, label=label, name=n) for n in names}


def _read_layers(folder: Path, manifest: AdapterManifest, *, verify: bool,
                 expected: dict[str, tuple[int, ...]] | None,
                 data: bytes | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    label = f"adapter {manifest.concept_id}"
    if data is None:
        data = _read_weight_files(folder, manifest, verify=verify)[DIFFUSERS_WEIGHTS]
    tensors = parse_weights(data, label=label, name=DIFFUSERS_WEIGHTS, expected=expected)
    layers: dict[str, list] = {}
    for key, t in tensors.items():
        if not key.startswith("transformer.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise TensorMismatch(f"{label}: unexpected key {key[:80]!r}")
        name, kind = key[len("transformer."):-len(".weight")].rsplit(".", 1)
        layers.setdefault(name, [None, None])[0 if kind == "lora_A" else 1] = t
    incomplete = sorted(k for k, (a, b) in layers.items() if a is None or b is None)
    if incomplete:
        raise TensorMismatch(f"{label}: layers without both lora_A and lora_B: {incomplete[:3]}")
    return {k: (v[0], v[1]) for k, v in layers.items()}


def load_flat(bank: AdapterBank, folder: str | Path, *, base_fingerprint: str | None = None,
              verify: bool = True, concept_id: str | None = None) -> tuple[AdapterManifest, torch.Tensor]:
    """Load an adapter folder's LoRA into a flat vector for ``bank`` (``load_concept`` without the
    embeddings: for callers that use the LoRA alone)."""
    manifest, flat, _ = load_concept(bank, folder, base_fingerprint=base_fingerprint, verify=verify,
                                     concept_id=concept_id)
    return manifest, flat


def load_concept(bank: AdapterBank, folder: str | Path, *, base_fingerprint: str | None = None,
                 verify: bool = True, concept_id: str | None = None
                 ) -> tuple[AdapterManifest, torch.Tensor, torch.Tensor | None]:
    """A whole concept for ``bank``: manifest, flat LoRA vector and its embeddings: layer-wise
    (blocks, dim), CLIP tokens (dim_l + dim_g,), or None (checks base, rank, tensors, shapes, hashes,
    finiteness).

    The manifest is read once, and every weights file checked against that same manifest and parsed
    from the bytes that were hashed. Load it into a slot with ``bank.load_slot(slot, flat, emb=emb,
    trigger=manifest.trigger)``.
    """
    folder = adapter_folder(folder)
    manifest = read_adapter_manifest(folder, concept_id=concept_id)
    label = f"adapter {manifest.concept_id}"
    if base_fingerprint is not None and manifest.base_fingerprint != base_fingerprint:
        raise BaseMismatch(f"{label}: trained on base {manifest.base_fingerprint}, this model is {base_fingerprint}")
    if manifest.rank != bank.rank:
        raise BaseMismatch(f"{label}: rank {manifest.rank}, bank rank {bank.rank}")
    files = _read_weight_files(folder, manifest, verify=verify)
    layers = _read_layers(folder, manifest, verify=verify, expected=expected_tensors(bank),
                          data=files[DIFFUSERS_WEIGHTS])
    if manifest.alpha != bank.alpha:
        # the bank scales every slot by its own alpha / rank; a concept trained at another alpha keeps
        # its trained scale with B multiplied by the ratio (B A x alpha_m / r = (alpha_m / alpha_b) B A x alpha_b / r)
        ratio = manifest.alpha / bank.alpha
        layers = {name: (a, b * ratio) for name, (a, b) in layers.items()}
    try:
        flat = bank.flatten(layers)
    except ValueError as exc:
        raise TensorMismatch(f"{label}: {exc}") from None
    check_finite(flat, label)
    emb = None
    if manifest.embeddings == "layerwise":
        if bank.embeddings is None:
            raise TensorMismatch(f"{label}: has layer-wise embeddings, this bank has no embedding slots")
        shape = bank.embeddings.shape
        emb = parse_weights(files[EMBEDDINGS], label=label, name=EMBEDDINGS,
                            expected={EMBEDDINGS_KEY: shape})[EMBEDDINGS_KEY].float()
    elif manifest.embeddings == "clip-token":
        if bank.tokens is None:
            raise TensorMismatch(f"{label}: has CLIP token embeddings, this bank has no CLIP token slots")
        parts = parse_weights(files[EMBEDDINGS], label=label, name=EMBEDDINGS,
                              expected=dict(zip(CLIP_KEYS, ((d,) for d in bank.tokens.dims))))
        emb = torch.cat([parts[k].float() for k in CLIP_KEYS])
    return manifest, flat, emb
