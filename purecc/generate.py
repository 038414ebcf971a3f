"""Generation with per-sample concept sets: ``W x + sum_k w_k B_k A_k x`` for each sample's concepts.

The diffusers pipeline does the denoising; the bank's routing rows select each sample's concepts and
weights, so one batch can mix different concept sets. Each sample has its own seed (its own
generator), so a sample's image does not depend on what else is in the batch.
"""

from __future__ import annotations

import io
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from PIL import Image

from .adapter_files import AdapterManifest, load_concept, read_adapter_manifest
from .bank import AdapterBank, attach_bank, attach_clip_tokens
from .concept_embeddings import CLIP_TOKENS, clip_trigger_positions, trigger_positions
from .fileio import atomic_write_bytes
from .model import base_fingerprint

PLACEHOLDER = re.compile(r"<([a-z0-9][a-z0-9_-]{0,63})>")


@dataclass(frozen=True)
class Sample:
    """One image to generate. ``concepts``: (concept_id, weight) pairs."""

    prompt: str
    seed: int
    concepts: tuple[tuple[str, float], ...] = ()
    negative_prompt: str = ""


@dataclass(frozen=True)
class RenderSettings:
    """Settings shared by every sample of one pipeline call."""

    steps: int = 28
    guidance: float = 7.0
    width: int = 1024
    height: int = 1024
    max_sequence_length: int | None = None   # T5 tokens; None: 256 with T5, else 77 (as in training)


def sequence_length(pipe, settings: RenderSettings) -> int:
    """T5 tokens to encode prompts with: the setting's, else 256 with T5 (the pipeline's default),
    else 77 (without T5 the pipeline pads zeros in its place: as many as training saw by default)."""
    if settings.max_sequence_length is not None:
        return settings.max_sequence_length
    return 256 if getattr(pipe, "text_encoder_3", None) is not None else 77


def trained_sequence_length(manifests: Iterable[AdapterManifest]) -> int | None:
    """The ``max_sequence_length`` the concepts were trained with (None without concepts), so that
    serving encodes prompts as training did; concepts trained with different lengths are refused."""
    lengths = {m.concept_id: m.max_sequence_length for m in manifests}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"concepts: trained with different max_sequence_length {lengths}; "
                         "compose only concepts trained with the same prompt length")
    return next(iter(lengths.values()), None)


def fill_placeholders(prompt: str, triggers: Mapping[str, str]) -> str:
    """Replace ``<concept_id>`` with that concept's trigger word; unknown ids raise KeyError(id)."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in triggers:
            raise KeyError(m.group(1))
        return triggers[m.group(1)]
    return PLACEHOLDER.sub(sub, prompt)


def routing_rows(samples: Sequence[Sample], slot_of: Mapping[str, int], num_slots: int) -> torch.Tensor:
    """(B, S) routing: sample b gets weight w on the slot holding each of its concepts.

    ``slot_of``: routing key -> slot; the keys of ``Sample.concepts`` are concept ids or, for
    ``LoadedConcepts.slot_of_folder``, adapter folders. A key given twice adds its weights.
    """
    w = torch.zeros(len(samples), num_slots)
    for b, s in enumerate(samples):
        for cid, weight in s.concepts:
            w[b, slot_of[cid]] += weight
    return w


def embedding_placement(pipe, samples: Sequence[Sample], slot_of: Mapping[str, int], bank: AdapterBank,
                        settings: RenderSettings) -> torch.Tensor | None:
    """(B or 2B, T, S): where each sample's concepts with embeddings put them (None: no such concept).

    A concept's embeddings go on its own trigger's tokens in its own sample, scaled by the sample's
    weight for it; composing two concepts gives each trigger its own. With classifier-free guidance
    the rows are [negative prompts; prompts], as the pipeline stacks them.
    """
    embs = bank.embeddings
    if embs is None:
        return None
    used = {slot_of[k] for s in samples for k, _ in s.concepts}
    with_emb = sorted(s for s in used if embs.triggers[s] is not None)
    if not with_emb:
        return None
    msl = sequence_length(pipe, settings)
    cfg = settings.guidance > 1
    texts = ([s.negative_prompt for s in samples] if cfg else []) + [s.prompt for s in samples]
    weights = routing_rows(samples, slot_of, bank.num_slots)          # (B, S)
    if cfg:
        weights = torch.cat([weights, weights])
    place = torch.zeros(len(texts), CLIP_TOKENS + msl, bank.num_slots)
    for slot in with_emb:
        masks = trigger_positions(pipe, texts, embs.triggers[slot], msl).float()
        place[:, :, slot] = masks * weights[:, slot:slot + 1]
    return place


def token_placement(pipe, samples: Sequence[Sample], slot_of: Mapping[str, int], bank: AdapterBank,
                    settings: RenderSettings) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(prompt rows, negative-prompt rows or None without guidance), each (B, 77, S): where each
    sample's concepts with CLIP tokens put them (None: no such concept in the batch)."""
    tokens = bank.tokens
    if tokens is None:
        return None
    used = {slot_of[k] for s in samples for k, _ in s.concepts}
    with_tok = sorted(s for s in used if tokens.triggers[s] is not None)
    if not with_tok:
        return None
    weights = routing_rows(samples, slot_of, bank.num_slots)          # (B, S)

    def rows(texts: list[str]) -> torch.Tensor:
        place = torch.zeros(len(texts), CLIP_TOKENS, bank.num_slots)
        for slot in with_tok:
            masks = clip_trigger_positions(pipe, texts, tokens.triggers[slot]).float()
            place[:, :, slot] = masks * weights[:, slot:slot + 1]
        return place
    negatives = rows([s.negative_prompt for s in samples]) if settings.guidance > 1 else None
    return rows([s.prompt for s in samples]), negatives


def _encoded_prompts(pipe, samples: Sequence[Sample], bank: AdapterBank, settings: RenderSettings,
                     rows: tuple[torch.Tensor, torch.Tensor | None]) -> dict:
    """The pipeline's prompt embeddings, encoded here with each sample's CLIP tokens in place (the
    pipeline would encode prompts and negative prompts in calls of its own, where no per-call
    placement can be given)."""
    common = dict(prompt_2=None, prompt_3=None, device=pipe._execution_device, do_classifier_free_guidance=False,
                  max_sequence_length=sequence_length(pipe, settings))
    with bank.tokens.placement(rows[0]):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=[s.prompt for s in samples], **common)
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if rows[1] is not None:
        with bank.tokens.placement(rows[1]):
            neg, _, neg_pooled, _ = pipe.encode_prompt(prompt=[s.negative_prompt for s in samples], **common)
        out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    return out


class RenderCancelled(RuntimeError):
    """``should_stop`` asked a render to stop; raised between denoising steps (or before the first)."""

    def __init__(self, steps_done: int, steps: int):
        super().__init__(steps_done, steps)
        self.steps_done, self.steps = steps_done, steps

    def __str__(self) -> str:
        return f"the render was stopped after {self.steps_done} of {self.steps} denoising steps"


def _stop_check(should_stop: Callable[[], bool], steps: int):
    """A diffusers ``callback_on_step_end`` that raises ``RenderCancelled`` once ``should_stop()``."""
    def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
        if should_stop():
            raise RenderCancelled(step + 1, steps)
        return tensors
    return on_step_end


@torch.no_grad()
def generate(pipe, samples: Sequence[Sample], slot_of: Mapping[str, int], settings: RenderSettings,
             *, output_type: str = "pil", should_stop: Callable[[], bool] | None = None) -> list:
    """Render ``samples`` in one batched pipeline call; concepts must already sit in bank slots.

    ``should_stop``: asked before the first step and after every step; once it answers True the
    render raises ``RenderCancelled`` there, so a caller that gave up stops costing the device.
    """
    bank: AdapterBank | None = getattr(pipe.transformer, "adapter_bank", None)
    needs_bank = any(s.concepts for s in samples)
    if needs_bank and bank is None:
        raise ValueError("concepts: the model has no adapter bank; load concepts first")
    if should_stop is not None and should_stop():
        raise RenderCancelled(0, settings.steps)
    device = pipe._execution_device
    gens = [torch.Generator(device="cpu").manual_seed(s.seed) for s in samples]
    weights = routing_rows(samples, slot_of, bank.num_slots) if bank is not None else None
    place = embedding_placement(pipe, samples, slot_of, bank, settings) if needs_bank else None
    tokens = token_placement(pipe, samples, slot_of, bank, settings) if needs_bank else None
    prompts = _encoded_prompts(pipe, samples, bank, settings, tokens) if tokens is not None else \
        {"prompt": [s.prompt for s in samples], "negative_prompt": [s.negative_prompt for s in samples]}
    with (bank.routing(weights) if bank is not None else nullcontext()), \
            (bank.embeddings.placement(place) if place is not None else nullcontext()):
        out = pipe(**prompts, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                   width=settings.width, height=settings.height, generator=gens,
                   latents=_initial_latents(pipe, gens, settings, device), output_type=output_type,
                   max_sequence_length=sequence_length(pipe, settings),
                   callback_on_step_end=_stop_check(should_stop, settings.steps) if should_stop else None,
                   callback_on_step_end_tensor_inputs=[])
    return out.images


def _initial_latents(pipe, gens, settings: RenderSettings, device) -> torch.Tensor:
    """Per-sample starting noise drawn on CPU from each sample's own generator (device-independent)."""
    c = pipe.transformer.config.in_channels
    h, w = settings.height // pipe.vae_scale_factor, settings.width // pipe.vae_scale_factor
    dtype = pipe.transformer.dtype
    return torch.stack([torch.randn((c, h, w), generator=g) for g in gens]).to(device, dtype)


@dataclass
class LoadedConcepts:
    """What ``load_concepts`` put in the bank.

    ``slot_of_folder``: each folder (``str`` of it, as given) -> its slot; route by it when several
    folders may share a concept id (a concept's stage1 and stage2 adapters). ``slot_of``,
    ``triggers``, ``manifests``: per concept id; ``slot_of`` and ``manifests`` name the first folder
    of an id that several folders share (their triggers are the same, ``load_concepts`` checks it).
    """

    slot_of: dict[str, int] = field(default_factory=dict)
    triggers: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, AdapterManifest] = field(default_factory=dict)
    slot_of_folder: dict[str, int] = field(default_factory=dict)


def _check_triggers(folders: Sequence[str], manifests: Sequence[AdapterManifest]) -> None:
    """Folders sharing a concept id must share its trigger, else ``<concept_id>`` would be ambiguous."""
    first: dict[str, tuple[str, AdapterManifest]] = {}
    for folder, m in zip(folders, manifests):
        prev_folder, prev = first.setdefault(m.concept_id, (folder, m))
        if prev.trigger != m.trigger:
            raise ValueError(f"concepts: adapters {prev_folder} (trigger {prev.trigger!r}) and {folder} "
                             f"(trigger {m.trigger!r}) share concept id {m.concept_id!r} but not its trigger")


def load_concepts(pipe, folders: Sequence[str | Path], *, num_slots: int | None = None) -> LoadedConcepts:
    """Attach a bank (if needed) and load each adapter folder into its own slot (checks the base).

    A folder given twice is loaded once (one slot; routing adds the weights given to it).
    """
    keys = list(dict.fromkeys(str(f) for f in folders))
    _check_triggers(keys, [read_adapter_manifest(k) for k in keys])   # before the bank changes
    tr = pipe.transformer
    bank = getattr(tr, "adapter_bank", None)
    fp = base_fingerprint(tr)
    if bank is None:
        bank = attach_bank(tr, max(num_slots or 0, len(keys), 1), dtype=tr.dtype)
    attach_clip_tokens(pipe, bank)       # concepts whose embeddings are CLIP tokens load into these
    if len(keys) > bank.num_slots:
        raise ValueError(f"concepts: {len(keys)} requested, the bank has {bank.num_slots} slots")
    loaded = LoadedConcepts()
    for slot, folder in enumerate(keys):
        manifest, flat, emb = load_concept(bank, folder, base_fingerprint=fp)
        bank.load_slot(slot, flat.to(bank.storage.dtype), emb=emb, trigger=manifest.trigger)
        loaded.slot_of_folder[folder] = slot
        loaded.slot_of.setdefault(manifest.concept_id, slot)
        loaded.triggers.setdefault(manifest.concept_id, manifest.trigger)
        loaded.manifests.setdefault(manifest.concept_id, manifest)
    return loaded


def png_bytes(image: Image.Image) -> bytes:
    """The one PNG encoding of generated images (files and HTTP answers): same pixels, same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as a PNG to ``path``, atomically."""
    return atomic_write_bytes(path, png_bytes(image))
