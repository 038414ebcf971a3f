"""``purecc import``: a LoRA trained elsewhere becomes a registered concept, servable like a trained one.

Two sources for the same base model:

* a diffusers LoRA file (``pytorch_lora_weights.safetensors``, as ``train_dreambooth_lora_sd3.py``
  writes it: ``transformer.<layer>.lora_A.weight`` / ``lora_B.weight``), or a folder holding one;
* a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<layer>.lora_A.weight``).

The LoRA's scale (``lora_alpha / r``, from the PEFT config or the diffusers file's
``lora_adapter_metadata``; 1 when neither says, as ``load_lora_weights`` assumes) is folded into
``B`` so that the bank's own scale reproduces it. A layer the LoRA does not adapt gets zeros, and a
LoRA of a lower rank than the bank is padded with zero rows/columns: both leave its output exactly as
it was. Everything else that does not fit is refused naming the key, the layer, the rank or the
shape: a layer outside the bank's targets, a higher rank, a shape of another base, DoRA, per-layer
ranks, text-encoder LoRAs. The result is written by ``adapter_files.export_slot`` (hashed manifest,
the base fingerprint) and published with ``AdapterRegistry.publish``.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .adapter_files import (DIFFUSERS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, AdapterFileError, AdapterManifest,
                            export_slot)
from .bank import DEFAULT_PROJECTIONS, AdapterBank, LayerSpec, find_targets
from .fileio import sha256_file
from .ids import validate_concept_id, validate_trigger

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PREFIXES = {"diffusers": "transformer.", "peft": "base_model.model."}


class LoraImportError(AdapterFileError):
    """A LoRA that cannot be imported into the bank; the message names what does not fit."""


@dataclass
class ForeignLora:
    """A LoRA read from another tool's files: per layer (A (r, in), B (out, r)) and its scale."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    scale: float
    format: str          # "diffusers" or "peft"
    weights_file: Path


def _lora_config(config: dict, where: str) -> tuple[int | None, float | None, bool]:
    """(r, lora_alpha, use_rslora) of a PEFT LoraConfig dict; refuses what the bank cannot express."""
    if config.get("use_dora"):
        raise LoraImportError(f"{where}: DoRA adapters (use_dora) cannot be imported: the bank holds plain LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise LoraImportError(f"{where}: per-layer {key} {sorted(config[key])[:3]} cannot be imported: "
                                  "the bank has one rank and one alpha")
    r, alpha = config.get("r"), config.get("lora_alpha")
    return (int(r) if r is not None else None, float(alpha) if alpha is not None else None,
            bool(config.get("use_rslora")))


def _source_files(source: Path) -> tuple[str, Path, dict]:
    """(format, weights file, LoRA config) of ``source`` (a file or a folder)."""
    if source.is_file():
        fmt, weights = "diffusers", source
    elif (source / PEFT_CONFIG).is_file() and (source / PEFT_WEIGHTS).is_file():
        fmt, weights = "peft", source / PEFT_WEIGHTS
    elif (source / DIFFUSERS_WEIGHTS).is_file():
        fmt, weights = "diffusers", source / DIFFUSERS_WEIGHTS
    elif source.exists():
        raise LoraImportError(f"import {source.name}: neither a diffusers LoRA ({DIFFUSERS_WEIGHTS}) nor a PEFT "
                              f"adapter ({PEFT_CONFIG} + {PEFT_WEIGHTS})")
    else:
        raise FileNotFoundError(f"import: {source} does not exist")
    if weights.suffix != ".safetensors":
        raise LoraImportError(f"import {weights.name}: only .safetensors weights are read (never pickle)")
    if fmt == "peft":
        try:
            config = json.loads((source / PEFT_CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise LoraImportError(f"import {PEFT_CONFIG}: not valid JSON ({exc})") from None
        return fmt, weights, config
    with safe_open(str(weights), framework="pt") as f:
        raw = (f.metadata() or {}).get(DIFFUSERS_METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    # diffusers packs the transformer's LoraConfig with a "transformer." prefix
    return fmt, weights, {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}


def read_foreign_lora(source: str | Path) -> ForeignLora:
    """The layers, rank and scale of a diffusers LoRA file/folder or a PEFT adapter folder."""
    source = Path(source)
    fmt, weights, config = _source_files(source)
    r_cfg, alpha, rslora = _lora_config(config, f"import {weights.name}")
    prefix = PREFIXES[fmt]
    layers: dict[str, list] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key.startswith(("text_encoder", "te_", "lora_te")):
                raise LoraImportError(f"import {weights.name}: key {key!r} adapts a text encoder; only "
                                      "transformer LoRAs can be imported")
            body = key[len(prefix):] if key.startswith(prefix) else None
            kind = body.rsplit(".", 2)[-2:] if body else None
            if not body or kind not in (["lora_A", "weight"], ["lora_B", "weight"]):
                raise LoraImportError(f"import {weights.name}: unexpected key {key!r} (expected "
                                      f"{prefix}<layer>.lora_A.weight / .lora_B.weight)")
            name = body[:-len(".lora_A.weight")]
            layers.setdefault(name, [None, None])[0 if kind[0] == "lora_A" else 1] = f.get_tensor(key)
    if not layers:
        raise LoraImportError(f"import {weights.name}: no LoRA weights in it")
    ranks = set()
    for name, (a, b) in layers.items():
        if a is None or b is None:
            raise LoraImportError(f"import {weights.name}: layer {name} has only lora_{'B' if a is None else 'A'}")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraImportError(f"import {weights.name}: layer {name}: lora_A{tuple(a.shape)} and "
                                  f"lora_B{tuple(b.shape)} do not form a LoRA")
        ranks.add(int(a.shape[0]))
    if len(ranks) > 1:
        raise LoraImportError(f"import {weights.name}: layers of different ranks {sorted(ranks)}; the bank has one")
    rank = ranks.pop()
    if r_cfg is not None and r_cfg != rank:
        raise LoraImportError(f"import {weights.name}: its config says r={r_cfg}, its weights have rank {rank}")
    alpha = float(rank) if alpha is None else alpha
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    return ForeignLora({k: (v[0], v[1]) for k, v in layers.items()}, rank, scale, fmt, weights)


def bank_specs(transformer: torch.nn.Module, rank: int) -> list[LayerSpec]:
    """The bank's layer layout for ``transformer`` at ``rank`` (what ``attach_bank`` builds), not attached."""
    modules, specs, offset = dict(transformer.named_modules()), [], 0
    for name in find_targets(transformer):
        lin = modules[name]
        specs.append(LayerSpec(name, lin.in_features, lin.out_features, offset))
        offset += rank * (lin.in_features + lin.out_features)
    return specs


def fit_to_bank(lora: ForeignLora, specs: list[LayerSpec], rank: int, alpha: float) -> dict:
    """{layer: (A, B)} at the bank's rank and scale: zero layers where the LoRA has none, zero-padded
    ranks, the scale folded into B. ``LoraImportError`` naming the target, rank or shape that does not fit."""
    foreign = sorted(set(lora.layers) - {s.name for s in specs})
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise LoraImportError(f"import: target {foreign[0]!r}{more} is not adapted by the bank (targets: "
                              f"transformer_blocks.<i>.attn.{{{','.join(DEFAULT_PROJECTIONS)}}})")
    if lora.rank > rank:
        raise LoraImportError(f"import: the LoRA has rank {lora.rank}, the bank rank {rank} "
                              f"(serve with rank >= {lora.rank}, or import a LoRA of rank <= {rank})")
    factor = lora.scale / (alpha / rank)
    out = {}
    for s in specs:
        a = torch.zeros(rank, s.in_features)
        b = torch.zeros(s.out_features, rank)
        if s.name in lora.layers:
            la, lb = lora.layers[s.name]
            if tuple(la.shape) != (lora.rank, s.in_features) or tuple(lb.shape) != (s.out_features, lora.rank):
                raise LoraImportError(f"import: layer {s.name}: lora_A{tuple(la.shape)} lora_B{tuple(lb.shape)} do "
                                      f"not fit this base (expects A({lora.rank}, {s.in_features}) "
                                      f"B({s.out_features}, {lora.rank})): a LoRA for another model?")
            a[:lora.rank] = la.float()
            b[:, :lora.rank] = lb.float() * factor
        out[s.name] = (a, b)
    return out


def load_transformer(model: str):
    """The base transformer as training and serving load it (through the pipeline, T5 left out), so
    that its fingerprint is theirs (a transformer loaded alone carries another config path)."""
    from .model import ModelConfig, load_pipeline

    return load_pipeline(ModelConfig(path=model, load_t5=False)).transformer


def import_lora(source: str | Path, *, concept_id: str, trigger: str, model: str, dest: str | Path,
                rank: int = 4, alpha: float | None = None, transformer=None) -> Path:
    """Write ``source`` as a purecc adapter folder ``dest`` (PEFT + diffusers files, hashed manifest)."""
    from .model import base_fingerprint

    validate_concept_id(concept_id)
    validate_trigger(trigger)
    lora = read_foreign_lora(source)
    tr = transformer if transformer is not None else load_transformer(model)
    alpha = float(rank if alpha is None else alpha)
    specs = bank_specs(tr, rank)
    layers = fit_to_bank(lora, specs, rank, alpha)
    bank = AdapterBank(specs, 1, rank, alpha, torch.float32, torch.device("cpu"))
    flat = bank.flatten(layers)
    manifest = AdapterManifest(
        concept_id=concept_id, trigger=trigger, stage=2, steps=0, rank=rank, alpha=alpha, targets=[],
        base_fingerprint=base_fingerprint(tr),
        metrics={"source": "import", "source_format": lora.format, "source_rank": lora.rank,
                 "source_scale": lora.scale, "source_sha256": sha256_file(lora.weights_file),
                 "layers_adapted": len(lora.layers), "layers_in_bank": len(specs)})
    return export_slot(bank, flat, dest, manifest)


def import_and_publish(source: str | Path, *, concept_id: str, trigger: str, model: str, storage: str,
                       rank: int = 4, alpha: float | None = None) -> str:
    """Import ``source`` and publish it in the registry at ``storage``; returns the published location."""
    from .registry import AdapterRegistry

    registry = AdapterRegistry(storage)
    registry.path_of(concept_id)   # a bad id is refused before the model is loaded
    with tempfile.TemporaryDirectory(prefix="purecc-import-") as tmp:
        folder = import_lora(source, concept_id=concept_id, trigger=trigger, model=model, dest=Path(tmp) / concept_id,
                             rank=rank, alpha=alpha)
        return registry.publish(concept_id, folder)
