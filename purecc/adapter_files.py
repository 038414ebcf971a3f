"""Standard adapter files for one bank slot.

A concept folder holds:
  adapter_config.json + adapter_model.safetensors   PEFT format: ``PeftModel.from_pretrained(transformer, dir)``
  pytorch_lora_weights.safetensors                  diffusers format: ``pipe.load_lora_weights(dir)``
  purecc_adapter.json                               our manifest: id, trigger, stage, steps, rank, targets,
                                                    base fingerprint, sha256 of every weight file, metrics
Weights are safetensors only; every file is written atomically; a load checks hashes, targets,
shapes and the base fingerprint and refuses a mismatch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .bank import AdapterBank
from .fileio import atomic_save_tensors, atomic_write_json, sha256_file
from .ids import validate_concept_id

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
MANIFEST = "purecc_adapter.json"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """An adapter folder that is incomplete, tampered with, or made for another base."""


class NonFiniteAdapter(AdapterFileError):
    """Adapter weights holding NaN or Inf: never written, never loaded into a slot."""


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
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, data: dict) -> "AdapterManifest":
        """Build from parsed JSON, ignoring keys this version does not know."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _peft_config(bank: AdapterBank) -> dict:
    from peft import LoraConfig

    cfg = LoraConfig(r=bank.rank, lora_alpha=bank.alpha, lora_dropout=0.0, init_lora_weights="gaussian",
                     target_modules=[s.name for s in bank.specs])
    data = cfg.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}


def export_slot(bank: AdapterBank, flat: torch.Tensor, dest: str | Path, manifest: AdapterManifest) -> Path:
    """Write one concept's adapter (flat vector in ``bank``'s layout) as PEFT + diffusers files."""
    validate_concept_id(manifest.concept_id)
    check_finite(flat, f"export {manifest.concept_id}")
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
    manifest.files = {f: sha256_file(dest / f) for f in (PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_WEIGHTS)}
    atomic_write_json(dest / MANIFEST, asdict(manifest))  # written last: its presence marks completion
    return dest


def read_adapter_manifest(folder: str | Path) -> AdapterManifest:
    """The manifest of an adapter folder; ``AdapterFileError`` when it is missing or malformed."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise AdapterFileError(f"adapter {folder}: no {MANIFEST} (incomplete or not a purecc adapter)")
    try:
        return AdapterManifest.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise AdapterFileError(f"adapter {folder}: {MANIFEST} is malformed ({exc})") from exc


def verify_files(folder: Path, manifest: AdapterManifest) -> None:
    """Check every file the manifest lists exists and matches its sha256 (``AdapterFileError`` if not)."""
    for name, digest in manifest.files.items():
        if not (folder / name).is_file():
            raise AdapterFileError(f"adapter {folder}: file {name} is missing")
        if sha256_file(folder / name) != digest:
            raise AdapterFileError(f"adapter {folder}: sha256 of {name} does not match its manifest")


def load_adapter_layers(folder: str | Path, *, verify: bool = True) -> tuple[AdapterManifest, dict]:
    """Read the diffusers-format weights -> ({layer: (A, B)}), after checking hashes."""
    folder = Path(folder)
    manifest = read_adapter_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    layers: dict[str, list] = {}
    with safe_open(str(folder / DIFFUSERS_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            if not key.startswith("transformer.") or not key.endswith(".weight"):
                raise AdapterFileError(f"adapter {folder}: unexpected key {key!r}")
            name, kind = key[len("transformer."):-len(".weight")].rsplit(".", 1)
            layers.setdefault(name, [None, None])[0 if kind == "lora_A" else 1] = f.get_tensor(key)
    return manifest, {k: (v[0], v[1]) for k, v in layers.items()}


def load_flat(bank: AdapterBank, folder: str | Path, *, base_fingerprint: str | None = None,
              verify: bool = True) -> tuple[AdapterManifest, torch.Tensor]:
    """Load an adapter folder into a flat vector for ``bank`` (checks targets, shapes, base)."""
    manifest, layers = load_adapter_layers(folder, verify=verify)
    if base_fingerprint is not None and manifest.base_fingerprint != base_fingerprint:
        raise AdapterFileError(f"adapter {folder}: trained on base {manifest.base_fingerprint}, "
                               f"this model is {base_fingerprint}")
    if manifest.rank != bank.rank:
        raise AdapterFileError(f"adapter {folder}: rank {manifest.rank}, bank rank {bank.rank}")
    try:
        flat = bank.flatten(layers)
    except ValueError as exc:
        raise AdapterFileError(f"adapter {folder}: {exc}") from exc
    check_finite(flat, f"adapter {manifest.concept_id}")
    return manifest, flat
