"""The shared PureCC trainer: one frozen base, a pack of concepts, one bank slot per concept.

Use: ``setup()``, optional ``load_checkpoint(concept_id, folder)``, ``train(...)`` reporting through
callbacks, ``save_checkpoint(concept_id, folder)`` and ``export(concept_id, dest)``. Runners do not
drive it directly: ``purecc.pack.PackRecipe`` wraps it for ``purecc train`` and the Ray Train worker.

Every concept keeps its own data order and random streams (keyed by its seed, stage and step),
its own loss normalisation, gradient clipping, optimiser state and step count, so a concept
trained in a pack ends with the weights it gets trained alone, and a resumed run continues
exactly as if it had not stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from .adapter_files import AdapterManifest, export_slot, load_concept, read_adapter_manifest
from .bank import AdapterBank, attach_bank, attach_clip_tokens, one_hot_routing
from .concept_embeddings import CLIP_ENCODERS, CLIP_TOKENS, placement_rows, trigger_positions
from .data import ConceptManifest, LatentMoments, Preprocess, concept_latent_moments, read_concept_manifest
from .fileio import atomic_save_tensors, atomic_write_json, load_tensors, sha256_file
from .ids import validate_concept_id, validate_trigger
from .loss_curve import LossCurve
from .losses import noisy_latents, rng_for, sample_sigma, shifted_sigmas_table, stage1_loss, stage2_loss
from .model import base_fingerprint
from .recipe import StageRecipe
from .slot_optim import SlotAdamW, SlotHyper

CKPT_TENSORS, CKPT_STATE = "checkpoint.safetensors", "state.json"
PACK_KEYS = ("stage", "batch_size", "grad_accum", "resolution", "rank", "alpha", "mixed_precision",
             "max_sequence_length")
FP16_INIT_SCALE, FP16_GROWTH_INTERVAL = 2.0 ** 16, 2000   # torch.amp.GradScaler's defaults


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this concept/stage or is damaged."""


class ConceptDiverged(RuntimeError):
    """One concept of a pack diverged: its loss, gradient or update became non-finite at ``step``.

    The concept is taken out of its pack (slot zeroed, never routed again); its pack-mates go on.
    """

    def __init__(self, concept_id: str, step: int, what: str):
        self.concept_id, self.step, self.what = concept_id, step, what
        super().__init__(f"concept {concept_id} diverged at step {step}: its {what} became non-finite "
                         "(NaN/Inf); it was stopped and its slot cleared (lower its lr or check its data)")


@dataclass(frozen=True)
class ConceptJob:
    """One concept's stage to train.

    ``manifest``: the concept's data, as a manifest path (read at ``setup``) or already read;
    ``extractor_adapter``: the stage-1 adapter folder (stage 2 with the stage-1 extractor, or with
    embeddings: stage 1's are read from it);
    ``key``: identity of the training content, recorded in checkpoints: a checkpoint made under
    another key is refused.
    """

    concept_id: str
    trigger: str
    manifest: Path | ConceptManifest
    recipe: StageRecipe
    seed: int = 0
    extractor_adapter: Path | None = None
    key: str = ""

    def __post_init__(self) -> None:
        validate_concept_id(self.concept_id)
        validate_trigger(self.trigger)
        if self.recipe.stage == 2 and self.extractor_adapter is None:
            if self.recipe.extractor == "stage1":
                raise ValueError(f"{self.concept_id}: extractor_adapter is required for stage 2 with extractor 'stage1'")
            if self.recipe.embeddings != "none":
                raise ValueError(f"{self.concept_id}: extractor_adapter (the stage-1 adapter) is required for "
                                 "stage 2 with embeddings: stage 1's embeddings are read from it")


@dataclass
class _Concept:
    """What the trainer holds for one concept of the pack."""

    job: ConceptJob
    slot: int
    extractor_slot: int | None
    latents: LatentMoments                # posterior mean and std, each (N, 16, h, w)
    emb: dict[str, tuple[torch.Tensor, torch.Tensor]]  # column -> (embeds (N, L, D), pooled (N, P))
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # column -> trigger tokens (N, L) bool
    prompts: dict[str, list[str]] = field(default_factory=dict)   # column -> prompts (CLIP tokens re-encode)
    step: int = 0
    curve: LossCurve = field(default_factory=LossCurve)
    status: str = "pending"
    loss_scale: float = FP16_INIT_SCALE   # fp16 only: this concept's dynamic loss scale
    scale_good_steps: int = 0
    error: str | None = None              # why it failed (status "failed")

    @property
    def losses(self) -> list[float]:
        """The last ``loss_curve.WINDOW`` per-step losses."""
        return list(self.curve.recent)

    @property
    def total(self) -> int:
        """Steps of this concept's stage."""
        return self.job.recipe.steps

    @property
    def form(self) -> str:
        """The concept's embeddings form ("none", "layerwise", "clip-token")."""
        return self.job.recipe.embeddings

    @property
    def trains_embeddings(self) -> bool:
        """Whether this stage updates the concept's embeddings."""
        return self.form != "none" and self.job.recipe.train_embeddings

    @property
    def encodes_per_step(self) -> bool:
        """CLIP tokens being trained: the complete caption goes through the text encoders every step."""
        return self.form == "clip-token" and self.job.recipe.train_embeddings


class Draw(NamedTuple):
    """One concept's micro-batch: manifest rows, clean latents, noise and sigmas (B = len(rows))."""

    rows: list[int]
    x0: torch.Tensor          # (B, 16, h, w)
    eps: torch.Tensor         # (B, 16, h, w)
    sigma: torch.Tensor       # (B,)


# latents, per prompt column (embeds, pooled), and optionally per column the trigger's tokens (N, L)
# and the prompts themselves (concepts with CLIP tokens: their encodings depend on the tokens)
ConceptTensors = tuple  # (LatentMoments | Tensor, dict[str, (Tensor, Tensor)][, dict[str, Tensor][, dict]])
MetricsFn = Callable[[dict], None]
CheckpointFn = Callable[[list[str]], None]


class PackTrainer:
    """Trains one stage of a pack of concepts on one frozen base, one bank slot per concept."""

    def __init__(self, pipe, jobs: Sequence[ConceptJob], *, cache_dir: str | Path | None = None,
                 on_metrics: MetricsFn | None = None):
        if not jobs:
            raise ValueError("jobs: a pack needs at least one concept")
        ids = [j.concept_id for j in jobs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"jobs: duplicate concept ids {ids}")
        first = jobs[0].recipe
        for j in jobs[1:]:
            bad = [k for k in PACK_KEYS if getattr(j.recipe, k) != getattr(first, k)]
            if bad:
                raise ValueError(f"jobs: {j.concept_id} differs from {jobs[0].concept_id} in {bad}; "
                                 "a pack shares stage, batch shape, resolution and rank")
        self.pipe, self.jobs, self.cache_dir = pipe, list(jobs), cache_dir
        self.on_metrics = on_metrics
        self.stage = first.stage
        self.concepts: dict[str, _Concept] = {}
        self.bank: AdapterBank | None = None
        self.optim: SlotAdamW | None = None
        self.failures: dict[str, ConceptDiverged] = {}

    # ----- setup ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of the transformer."""
        return next(self.pipe.transformer.parameters()).device

    def _slots_needed(self) -> int:
        k = len(self.jobs)
        return 2 * k if self.stage == 2 and any(j.recipe.extractor == "stage1" for j in self.jobs) else k

    def setup(self) -> None:
        """Attach (or reuse) the bank, encode every concept's latents and prompts, initialise slots."""
        self._attach()
        data = {job.concept_id: self._encode_concept(job) for job in self.jobs}
        self.setup_precomputed(data, self._encode([""]))

    def setup_precomputed(self, data: dict[str, ConceptTensors], empty: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Set up from latents and prompt embeddings computed elsewhere (no VAE or text encoder runs).

        ``data[cid]``: latents (N, 16, h, w), per prompt column (embeds (N, L, D), pooled (N, P)) and,
        for concepts with embeddings, per column the trigger's tokens (N, L) bool, and for CLIP tokens
        per column the prompts (their columns are encoded again here, with the concept's tokens);
        ``empty``: the embedding of "" as (1, L, D), (1, P).
        """
        if self.bank is None:
            self._attach()
        self.empty = empty
        k = len(self.jobs)
        embs = self.bank.embeddings
        for i, job in enumerate(self.jobs):
            latents, emb, *rest = data[job.concept_id]
            if self.stage == 2 and job.recipe.r_reference == "class" and "class_prompt" not in emb:
                raise ValueError(f"{job.concept_id}: r_reference 'class' needs the embeddings of the "
                                 "class_prompt column (the target caption without the trigger)")
            masks = rest[0] if rest else {}
            prompts = rest[1] if len(rest) > 1 else {}
            if isinstance(latents, torch.Tensor):      # precomputed means only (benchmarks)
                latents = LatentMoments(latents, torch.zeros_like(latents))
            self.bank.init_slot(i, rng_for(job.seed, "init", self.stage))
            self.optim.reset_slot(i)
            for optim in self._emb_optims.values():
                optim.reset_slot(i)
            for store in (embs, self.bank.tokens):
                if store is not None:
                    store.clear_slot(i)
            ext, stage1_emb = None, None
            form = job.recipe.embeddings
            if self.stage == 2 and job.extractor_adapter is not None:
                if form != "none" and read_adapter_manifest(job.extractor_adapter).embeddings != form:
                    raise ValueError(f"{job.concept_id}: stage 2 with embeddings {form!r} needs a stage-1 adapter "
                                     f"with embeddings of that form (train stage 1 with embeddings {form!r})")
                _, flat, stage1_emb = load_concept(self.bank, job.extractor_adapter, base_fingerprint=self.fingerprint)
                if job.recipe.extractor == "stage1":   # the whole stage-1 model: its LoRA and embeddings
                    self.bank.load_slot(k + i, flat.to(self.bank.storage.dtype), emb=stage1_emb, trigger=job.trigger)
                    ext = k + i
            if form != "none":
                store = self._store(form)
                if self.stage == 1:
                    store.load_slot(i, torch.zeros(store.shape), job.trigger)
                elif stage1_emb is None or (stage1_emb.dim() == 1) != (form == "clip-token"):
                    raise ValueError(f"{job.concept_id}: stage 2 with embeddings {form!r} needs a stage-1 adapter "
                                     f"with embeddings of that form (train stage 1 with embeddings {form!r})")
                else:
                    store.load_slot(i, stage1_emb, job.trigger)
            uses = form != "none" or (ext is not None and stage1_emb is not None)
            if uses and not masks:
                raise ValueError(f"{job.concept_id}: embeddings need the trigger's token positions of its prompts")
            c = _Concept(job, i, ext, latents, emb, masks, prompts)
            if form == "clip-token" or (ext is not None and stage1_emb is not None and stage1_emb.dim() == 1):
                self._encode_token_columns(c)
            self.concepts[job.concept_id] = c
        self.bank.set_trainable([c.slot for c in self.concepts.values()])
        for form, store in (("layerwise", embs), ("clip-token", self.bank.tokens)):
            if store is not None:
                store.storage.requires_grad_(any(c.trains_embeddings and c.form == form
                                                 for c in self.concepts.values()))

    def _attach(self) -> None:
        tr = self.pipe.transformer
        tr.requires_grad_(False)
        self.fingerprint = base_fingerprint(tr)
        rec = self.jobs[0].recipe
        bank = getattr(tr, "adapter_bank", None)
        if bank is None:
            bank = attach_bank(tr, self._slots_needed(), rank=rec.rank, alpha=rec.alpha)
        elif bank.num_slots < self._slots_needed() or bank.rank != rec.rank:
            raise ValueError(f"bank: the model's bank has {bank.num_slots} slots of rank {bank.rank}; "
                             f"this pack needs {self._slots_needed()} of rank {rec.rank}")
        self.bank, self.optim = bank, SlotAdamW(bank.storage)
        self._emb_optims = {"layerwise": SlotAdamW(bank.embeddings.storage)}
        stage1_forms = {read_adapter_manifest(j.extractor_adapter).embeddings
                        for j in self.jobs if self.stage == 2 and j.extractor_adapter is not None}
        if any(j.recipe.embeddings == "clip-token" for j in self.jobs) or "clip-token" in stage1_forms:
            if attach_clip_tokens(self.pipe, bank) is None:
                raise ValueError("embeddings: clip-token needs the pipeline's CLIP-L and CLIP-G text encoders")
            for name in (*CLIP_ENCODERS, "text_encoder_3"):     # the tokens train through them, frozen
                encoder = getattr(self.pipe, name, None)
                if encoder is not None:
                    encoder.requires_grad_(False)
        if bank.tokens is not None:
            self._emb_optims["clip-token"] = SlotAdamW(bank.tokens.storage)
        self.sigma_table = shifted_sigmas_table(self.pipe.scheduler)

    def _store(self, form: str):
        """The bank's store of embeddings of ``form``."""
        return self.bank.tokens if form == "clip-token" else self.bank.embeddings

    @property
    def emb_optim(self) -> SlotAdamW:
        """The layer-wise embeddings' optimiser."""
        return self._emb_optims["layerwise"]

    def _encode_concept(self, job: ConceptJob) -> ConceptTensors:
        rec = job.recipe
        manifest = job.manifest if isinstance(job.manifest, ConceptManifest) \
            else read_concept_manifest(job.manifest, job.trigger)
        pre = Preprocess(resolution=rec.resolution, crop=rec.crop, flip_prob=rec.flip_prob)
        latents = concept_latent_moments(manifest, self.pipe.vae, pre, seed=job.seed, cache_dir=self.cache_dir)
        cols = ("prompt", "base_prompt", "target_prompt") if self.stage == 2 else ("prompt",)
        if self.stage == 2 and rec.r_reference == "class":
            cols += ("class_prompt",)
        prompts = {c: [getattr(r, c) for r in manifest.rows] for c in cols}
        emb = {c: self._encode(p) for c, p in prompts.items()}
        masks = {c: trigger_positions(self.pipe, p, job.trigger, rec.max_sequence_length) for c, p in prompts.items()}
        return latents, emb, masks, prompts

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.jobs[0].recipe.max_sequence_length)
        return embeds.float().cpu(), pooled.float().cpu()

    def _encode_with_tokens(self, prompts: list[str], masks: torch.Tensor, slot: int,
                            grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` encoded with ``slot``'s CLIP tokens on their trigger tokens ``masks`` (B, L);
        on the device, and differentiable in the tokens when ``grad``."""
        rows = placement_rows(masks[:, :CLIP_TOKENS], [slot] * len(prompts), self.bank.num_slots)
        with self.bank.tokens.placement(rows), torch.set_grad_enabled(grad):
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.jobs[0].recipe.max_sequence_length)
        return embeds.float(), pooled.float()

    def _encode_token_columns(self, c: _Concept) -> None:
        """The columns a concept's frozen CLIP tokens change, encoded once with them: ``prompt`` (its
        trainable slot, unless it trains them: then every step) and ``target_prompt`` with the
        extractor's tokens, and ``prompt`` once more with those (``prompt_ext``, lambda* (C))."""
        if not c.prompts:
            raise ValueError(f"{c.job.concept_id}: CLIP token embeddings need the prompts of its columns "
                             "(set up from a manifest, not from precomputed embeddings)")
        todo = []
        if c.form == "clip-token" and not c.encodes_per_step:
            todo.append(("prompt", "prompt", c.slot))
        if c.extractor_slot is not None and self.bank.tokens.triggers[c.extractor_slot] is not None:
            todo += [("target_prompt", "target_prompt", c.extractor_slot), ("prompt_ext", "prompt", c.extractor_slot)]
        for key, column, slot in todo:
            embeds, pooled = self._encode_with_tokens(c.prompts[column], c.masks[column], slot, grad=False)
            c.emb[key] = (embeds.cpu(), pooled.cpu())
            c.masks[key] = c.masks[column]

    # ----- one step ------------------------------------------------------------------------
    def _draw(self, c: _Concept, micro: int) -> Draw:
        """One concept's micro-batch, from its own streams."""
        rec, n = c.job.recipe, len(c.latents.mean)
        rows = []
        for j in range(rec.batch_size):
            k = (c.step * rec.grad_accum + micro) * rec.batch_size + j
            perm = torch.randperm(n, generator=rng_for(c.job.seed, "order", self.stage, k // n))
            rows.append(int(perm[k % n]))
        g = rng_for(c.job.seed, "noise", self.stage, c.step, micro)
        x0 = c.latents.mean[rows]
        if rec.latent_sampling == "sample":     # a fresh posterior draw, from its own stream
            z = torch.randn(x0.shape, generator=rng_for(c.job.seed, "latent", self.stage, c.step, micro))
            x0 = x0 + c.latents.std[rows] * z
        eps = torch.randn(x0.shape, generator=g)
        sigma = sample_sigma(self.sigma_table, len(rows), g, rec.logit_mean, rec.logit_std)
        return Draw(rows, x0, eps, sigma)

    def _forward(self, x_t, sigma, embeds, pooled, slots: list[int | None],
                 masks: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer on a batch routed to ``slots``; ``masks`` (B, L): the trigger's tokens of each
        row, where the row's slot puts its embeddings (slots without embeddings put none)."""
        dev = self.device
        dtype = autocast_dtype(self.jobs[0].recipe.mixed_precision, dev)
        embs = self.bank.embeddings
        place = None
        if masks is not None:
            with_emb = [s if s is not None and embs.triggers[s] is not None else None for s in slots]
            if any(s is not None for s in with_emb):
                place = placement_rows(masks, with_emb, self.bank.num_slots)
        with self.bank.routing(one_hot_routing(slots, self.bank.num_slots)), embs.placement(place):
            with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = self.pipe.transformer(
                    hidden_states=x_t.to(dev), timestep=(sigma * 1000).to(dev),
                    encoder_hidden_states=embeds.to(dev), pooled_projections=pooled.to(dev),
                    return_dict=False)[0]
        return out.float()

    def _micro_step(self, active: list[_Concept], micro: int) -> dict[str, dict[str, torch.Tensor]]:
        draws = [self._draw(c, micro) for c in active]
        sizes = [len(d.rows) for d in draws]
        x0 = torch.cat([d.x0 for d in draws]).to(self.device)
        eps = torch.cat([d.eps for d in draws]).to(self.device)
        sigma = torch.cat([d.sigma for d in draws]).to(self.device)
        x_t = noisy_latents(x0, eps, sigma)
        train_slots = [c.slot for c, n in zip(active, sizes) for _ in range(n)]

        def encoded(c: _Concept, d: Draw, column: str) -> tuple[torch.Tensor, torch.Tensor]:
            if column == "prompt" and c.encodes_per_step:    # its CLIP tokens train: through the encoders
                return self._encode_with_tokens([c.prompts["prompt"][r] for r in d.rows], c.masks["prompt"][d.rows],
                                                c.slot, grad=True)
            e, p = c.emb[column] if column in c.emb else c.emb[column.removesuffix("_ext")]
            return e[d.rows].to(self.device), p[d.rows].to(self.device)

        def emb(column: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            """(embeds, pooled, trigger tokens or None) of ``column`` for every drawn row, in batch order
            (``prompt_ext``: the complete caption as the extractor's CLIP tokens encode it)."""
            parts = [encoded(c, d, column) for c, d in zip(active, draws)]
            embeds, pooled = torch.cat([e for e, _ in parts]), torch.cat([p for _, p in parts])
            masks = None
            if any(c.masks for c in active):
                masks = torch.cat([c.masks[column if column in c.masks else column.removesuffix("_ext")][d.rows]
                                   if c.masks else torch.zeros(len(d.rows), embeds.shape[1], dtype=torch.bool)
                                   for c, d in zip(active, draws)])
            return embeds, pooled, masks

        if self.stage == 1:
            e, p, m = emb("prompt")
            v = self._forward(x_t, sigma, e, p, train_slots, m)
            per = {"loss": stage1_loss(v, x0, eps, sigma, x_t, active[0].job.recipe.precondition)}
        else:
            per = self._stage2(active, draws, x0, eps, x_t, sigma, train_slots, emb)
        out, start = {}, 0
        for c, n in zip(active, sizes):
            out[c.job.concept_id] = {k: t[start:start + n].mean() for k, t in per.items()}
            start += n
        return out

    def _stage2(self, active: list[_Concept], draws: list[Draw], x0, eps, x_t, sigma, train_slots: list[int],
                emb: Callable[[str], tuple]) -> dict[str, torch.Tensor]:
        """Per-sample stage-2 losses: trainable passes on prompt/base_prompt, extractor on target_prompt
        and on R's reference ("", or the class caption with ``r_reference: class``).

        Embeddings go where the trigger is: the complete caption (``prompt``) and ``target_prompt``;
        ``base_prompt`` and R's reference hold no trigger, so those branches get none (no concept slot).
        """
        b = x_t.shape[0]
        (ep, pp, mp), (eb, pb, mb), (et, pt, mt) = emb("prompt"), emb("base_prompt"), emb("target_prompt")
        cat_masks = (lambda *ms: None if ms[0] is None else torch.cat(ms))
        ext_slots = [c.extractor_slot for c, d in zip(active, draws) for _ in d.rows]
        # when every concept detaches the base caption's branch, that branch needs no graph: it joins the
        # extractor's no-grad call (routed to the trainable slots, row by row), and the backward pass covers
        # the complete caption's rows only, a quarter less stage-2 compute; a pack that mixes the two
        # gradients keeps both branches in the graph (stage2_loss detaches per concept)
        base_in_graph = not all(c.job.recipe.detach_base for c in active)
        if base_in_graph:
            v = self._forward(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), torch.cat([ep, eb]),
                              torch.cat([pp, pb]), train_slots * 2, cat_masks(mp, mb))
            v_full, v_base = v[:b], v[b:]
        else:
            v_full = self._forward(x_t, sigma, ep, pp, train_slots, mp)
        e0, p0 = self.empty

        def reference(c: _Concept, d: Draw) -> tuple[torch.Tensor, torch.Tensor]:
            """What R subtracts, per row: "" (the paper's), or the target caption without the trigger."""
            if c.job.recipe.r_reference == "class":
                e, q = c.emb["class_prompt"]
                return e[d.rows].to(self.device), q[d.rows].to(self.device)
            return e0.expand(len(d.rows), -1, -1), p0.expand(len(d.rows), -1)

        refs = [reference(c, d) for c, d in zip(active, draws)]
        # lambda_mode "extractor" also needs the extractor on prompt and base_prompt: two more passes,
        # in the same batched call, only when a concept of the pack asks for it
        m0 = None if mt is None else torch.zeros_like(mt)
        conds = [(et, pt, mt), (torch.cat([e for e, _ in refs]), torch.cat([q for _, q in refs]), m0)]
        with_ext = any(c.job.recipe.lambda_mode == "extractor" for c in active)
        if with_ext:
            conds += [emb("prompt_ext"), (eb, pb, mb)]
        slots = ext_slots * len(conds)
        if not base_in_graph:
            conds.append((eb, pb, mb))
            slots += train_slots
        k = len(conds)
        with torch.no_grad():
            r = self._forward(torch.cat([x_t] * k), torch.cat([sigma] * k), torch.cat([e for e, _, _ in conds]),
                              torch.cat([q for _, q, _ in conds]), slots, cat_masks(*[m for *_, m in conds]))
        r = r.view(k, b, *r.shape[1:])
        if not base_in_graph:
            v_base = r[-1]
        parts, start = [], 0  # loss knobs (eta, lambda) may differ per concept
        for c, d in zip(active, draws):
            n = len(d.rows)
            sl = slice(start, start + n)
            rc = c.job.recipe
            extra = {"r_prompt": r[2][sl], "r_base": r[3][sl]} if with_ext else {}
            parts.append(stage2_loss(v_full[sl], v_base[sl], r[0][sl], r[1][sl], x0[sl], eps[sl],
                                     eta=rc.eta, lambda_mode=rc.lambda_mode, lambda_value=rc.lambda_value,
                                     lambda_max=rc.lambda_max, lambda_min=rc.lambda_min, detach_base=rc.detach_base,
                                     sigma=sigma[sl], precondition=rc.precondition, **extra))
            start += n
        # sigma beside lambda and cos_r in the logs, so a reader can see them per noise level
        return {**{k: torch.cat([p[k] for p in parts]) for k in parts[0]}, "sigma": sigma.detach().float()}

    def _gradients(self, active: list[_Concept], fp16: bool) -> tuple[list[_Concept], dict]:
        """Accumulate ``active``'s gradients for one step into ``storage.grad``; returns the concepts
        still active (those whose loss became non-finite are failed) and their summed metrics."""
        self.bank.storage.grad = None
        for form in self._emb_optims:
            self._store(form).storage.grad = None
        accum = active[0].job.recipe.grad_accum
        # fp16: each concept's loss carries its own scale, so one concept's overflow never changes another's
        scale = {c.job.concept_id: c.loss_scale if fp16 else 1.0 for c in active}
        sums: dict[str, dict[str, torch.Tensor]] = {c.job.concept_id: {} for c in active}
        for micro in range(accum):
            per = self._micro_step(active, micro)
            # a diverging concept fails alone, before its loss reaches the backward pass (one host
            # sync per micro-step): its overflowing activations would reach every slot's gradient
            # (inf * 0 = NaN in the shared matmuls)
            finite = torch.isfinite(torch.stack([per[c.job.concept_id]["loss"].detach() for c in active])).tolist()
            if not all(finite):
                for c, ok in zip(active, finite):
                    if not ok:
                        self._fail(c, "loss")
                # the healthy rest starts the step again without it: exactly a step without it
                rest = [c for c, ok in zip(active, finite) if ok]
                return self._gradients(rest, fp16) if rest else ([], {})
            total = sum(per[c.job.concept_id]["loss"] * scale[c.job.concept_id] for c in active) / accum
            total.backward()
            for c in active:
                cid = c.job.concept_id
                for k, t in per[cid].items():
                    sums[cid][k] = sums[cid].get(k, 0.0) + t.detach() / accum
        return active, sums

    def _grad_finite(self, active: list[_Concept]) -> list[bool]:
        """Per concept: is its slot's gradient finite (one host sync)?"""
        idx = torch.tensor([c.slot for c in active], device=self.bank.storage.device)
        ok = torch.isfinite(self.bank.storage.grad.index_select(0, idx)).all(dim=1)
        for form in self._emb_optims:
            grad = self._store(form).storage.grad
            if grad is not None:      # a concept training embeddings: theirs must be finite too
                ok = ok & torch.isfinite(grad.index_select(0, idx)).all(dim=1)
        return ok.tolist()

    def _finite_gradients(self, active: list[_Concept], fp16: bool) -> tuple[list[_Concept], dict]:
        """``_gradients`` with every concept whose own gradient is non-finite failed.

        A non-finite gradient in one slot can make a pack-mate's gradient NaN too (its samples' NaN
        activation gradients times a zero routing weight). So each flagged concept is checked on its own
        batch alone; the culprits fail and the step is computed again without them, so the survivors'
        step is exactly the step they take in a pack without the culprits.
        """
        while True:
            active, sums = self._gradients(active, fp16)
            if not active or fp16:   # fp16 overflow is the loss scaler's business (a skipped step)
                return active, sums
            flagged = [c for c, ok in zip(active, self._grad_finite(active)) if not ok]
            if not flagged:
                return active, sums
            culprits = flagged if len(flagged) == 1 else \
                [c for c in flagged if not self._gradients([c], fp16)[0] or not self._grad_finite([c])[0]]
            for c in culprits or flagged:   # non-finite only together: none can be told apart
                if c.status != "failed":
                    self._fail(c, "gradient")
            active = [c for c in active if c.status != "failed"]
            if not active:
                return [], {}

    def _train_step(self, active: list[_Concept]) -> None:
        fp16 = active[0].job.recipe.mixed_precision == "fp16"
        active, sums = self._finite_gradients(active, fp16)
        if not active:
            return
        hypers = [SlotHyper(c.job.recipe.lr, c.job.recipe.betas, c.job.recipe.adam_eps,
                            c.job.recipe.weight_decay, c.job.recipe.max_grad_norm) for c in active]
        norms = self.optim.step([c.slot for c in active], hypers,
                                grad_scale=[c.loss_scale for c in active] if fp16 else None)
        emb_ok = self._embedding_step(active, fp16)
        # one device->host transfer per step for every metric (each float() would be a sync)
        keys = list(sums[active[0].job.concept_id])
        values = torch.stack([torch.stack([sums[c.job.concept_id][k] for k in keys] + [norms[i]])
                              for i, c in enumerate(active)]).tolist()
        for c, row in zip(active, values):
            metrics = dict(zip(keys, row))
            if fp16:
                metrics["loss_scale"] = c.loss_scale
                self._update_scale(c, finite=math.isfinite(row[-1]))
            elif not math.isfinite(row[-1]) or not emb_ok.get(c.job.concept_id, True):
                # finite gradient, non-finite update: the optimiser refused it
                self._fail(c, "update")
                continue
            c.step += 1
            c.curve.add(metrics["loss"])
            if self.on_metrics:
                self.on_metrics({"concept_id": c.job.concept_id, "stage": self.stage, "step": c.step,
                                 "total": c.total, "grad_norm": row[-1], "lr": c.job.recipe.lr, **metrics,
                                 "loss_curve": c.curve})

    def _embedding_step(self, active: list[_Concept], fp16: bool) -> dict[str, bool]:
        """One AdamW step of the embeddings of the concepts that train them (their own lr, no weight
        decay, clipped at the recipe's norm); per concept whether the update was finite."""
        out = {}
        for form, optim in self._emb_optims.items():
            train = [c for c in active if c.trains_embeddings and c.form == form]
            if not train or self._store(form).storage.grad is None:
                continue
            hypers = [SlotHyper(c.job.recipe.embedding_lr, c.job.recipe.betas, c.job.recipe.adam_eps, 0.0,
                                c.job.recipe.max_grad_norm) for c in train]
            norms = optim.step([c.slot for c in train], hypers,
                               grad_scale=[c.loss_scale for c in train] if fp16 else None)
            out.update({c.job.concept_id: ok for c, ok in zip(train, torch.isfinite(norms).tolist())})
        return out

    def _fail(self, c: _Concept, what: str) -> None:
        """Take a diverged concept out of the pack: it stops training, its slot is zeroed and never
        routed again (``slot_of`` refuses it), its optimiser state is reset; the rest go on."""
        err = ConceptDiverged(c.job.concept_id, c.step + 1, what)
        c.status, c.error = "failed", str(err)
        self.failures[c.job.concept_id] = err
        self.bank.clear_slot(c.slot)
        self.optim.reset_slot(c.slot)
        for optim in self._emb_optims.values():
            optim.reset_slot(c.slot)

    @staticmethod
    def _update_scale(c: _Concept, *, finite: bool) -> None:
        """GradScaler's rule per concept: halve on overflow, double after a run of finite steps."""
        if not finite:
            c.loss_scale, c.scale_good_steps = c.loss_scale / 2, 0
            return
        c.scale_good_steps += 1
        if c.scale_good_steps >= FP16_GROWTH_INTERVAL:
            c.loss_scale, c.scale_good_steps = c.loss_scale * 2, 0

    # ----- the loop ------------------------------------------------------------------------
    def train(self, *, checkpoint_dir: str | Path | Callable[[str], Path] | None = None, on_checkpoint: CheckpointFn | None = None,
              should_stop: Callable[[], Iterable[str]] | None = None, max_steps: int | None = None) -> dict:
        """Train every concept to its step count (or ``max_steps`` more steps).

        Every ``checkpoint_every`` steps and at the end of each concept, its checkpoint is written to
        ``checkpoint_dir/<concept_id>`` (or ``checkpoint_dir(concept_id)`` when it is a callable) and
        ``on_checkpoint(ids)`` is called. ``should_stop()`` returns
        concept ids (or ``"*"``) to stop now; a stopped concept keeps a checkpoint at its last step.
        """
        if self.bank is None:
            raise RuntimeError("train: call setup() first")
        budget = {cid: (c.step + max_steps if max_steps else c.total) for cid, c in self.concepts.items()}
        while True:
            stop = set(should_stop()) if should_stop else set()
            active = [c for c in self.concepts.values()
                      if c.status != "failed" and c.step < min(c.total, budget[c.job.concept_id])]
            stopped = [c for c in active if "*" in stop or c.job.concept_id in stop]
            for c in stopped:
                c.status = "stopped"
            active = [c for c in active if c not in stopped]
            if stopped:
                self._checkpoint(stopped, checkpoint_dir, on_checkpoint)
            if not active:
                break
            self._train_step(active)
            due = [c for c in active if c.step % c.job.recipe.checkpoint_every == 0 or c.step >= c.total]
            self._checkpoint(due, checkpoint_dir, on_checkpoint)
        for c in self.concepts.values():
            if c.step >= c.total and c.status != "failed":
                c.status = "done"
        return {cid: self.summary(cid) for cid in self.concepts}

    def _checkpoint(self, concepts: list[_Concept], root, callback) -> None:
        if not concepts or root is None:
            return
        for c in concepts:
            cid = c.job.concept_id
            self.save_checkpoint(cid, root(cid) if callable(root) else Path(root) / cid)
        if callback:
            callback([c.job.concept_id for c in concepts])

    def slot_of(self, concept_id: str) -> int:
        """The bank slot training ``concept_id`` (for rendering with it: ``purecc.generate``); raises
        the concept's ``ConceptDiverged`` when it failed (its cleared slot is never routed)."""
        if concept_id in self.failures:
            raise self.failures[concept_id]
        return self.concepts[concept_id].slot

    def summary(self, concept_id: str) -> dict:
        """Step, status and loss summary of one concept."""
        c = self.concepts[concept_id]
        recent = c.losses
        return {"concept_id": concept_id, "stage": self.stage, "step": c.step, "total": c.total,
                "status": c.status, "error": c.error, "final_loss": recent[-1] if recent else None,
                "loss_last10": c.curve.last_mean(10)}

    # ----- checkpoints and export ----------------------------------------------------------
    def save_checkpoint(self, concept_id: str, folder: str | Path) -> Path:
        """Write the concept's adapter, optimiser state and step into ``folder`` (state.json last)."""
        c, folder = self.concepts[concept_id], Path(folder)
        tensors = {"adapter": self.bank.read_slot(c.slot).float(), **self.optim.slot_state(c.slot)}
        if c.form != "none":
            tensors["embeddings"] = self.bank.slot_embeddings(c.slot, c.form).float()
            tensors.update({f"embeddings.{k}": v for k, v in self._emb_optims[c.form].slot_state(c.slot).items()})
        atomic_save_tensors(folder / CKPT_TENSORS, tensors)
        state = {"concept_id": concept_id, "stage": self.stage, "step": c.step, "total": c.total,
                 "seed": c.job.seed, "job_key": c.job.key, "loss_curve": c.curve.to_dict(),
                 "loss_scale": c.loss_scale, "scale_good_steps": c.scale_good_steps, "recipe": c.job.recipe.to_dict(),
                 "base_fingerprint": self.fingerprint, "params_per_slot": self.bank.params_per_slot,
                 "sha256": sha256_file(folder / CKPT_TENSORS), "saved_at": time.time()}
        atomic_write_json(folder / CKPT_STATE, state)  # last: a folder with state.json is complete
        return folder

    def load_checkpoint(self, concept_id: str, folder: str | Path) -> int:
        """Restore adapter, optimiser state, step and loss history; returns the step."""
        c, folder = self.concepts[concept_id], Path(folder)
        state = read_checkpoint_state(folder)
        for key, want in (("concept_id", concept_id), ("stage", self.stage), ("seed", c.job.seed),
                          ("job_key", c.job.key),
                          ("base_fingerprint", self.fingerprint), ("params_per_slot", self.bank.params_per_slot)):
            if state.get(key, "" if key == "job_key" else None) != want:
                raise CheckpointError(f"checkpoint {folder}: {key} is {state.get(key)!r}, expected {want!r}")
        t = load_tensors(folder / CKPT_TENSORS)
        has_emb = c.job.recipe.embeddings != "none"
        if has_emb != ("embeddings" in t):
            raise CheckpointError(f"checkpoint {folder}: {'lacks' if has_emb else 'has'} embeddings, "
                                  f"the recipe's embeddings are {c.job.recipe.embeddings!r}")
        if has_emb:
            if tuple(t["embeddings"].shape) != tuple(self._store(c.form).shape):
                raise CheckpointError(f"checkpoint {folder}: its embeddings have shape {tuple(t['embeddings'].shape)}, "
                                      f"not those of {c.form!r} {tuple(self._store(c.form).shape)}")
            self.bank.load_slot(c.slot, t["adapter"].to(self.bank.storage.dtype), emb=t["embeddings"],
                                trigger=c.job.trigger)
            self._emb_optims[c.form].load_slot_state(c.slot, {k[len("embeddings."):]: v for k, v in t.items()
                                                              if k.startswith("embeddings.")})
        else:
            self.bank.load_slot(c.slot, t["adapter"].to(self.bank.storage.dtype))
        self.optim.load_slot_state(c.slot, t)
        c.step, c.curve = int(state["step"]), LossCurve.from_dict(state.get("loss_curve", {}))
        c.loss_scale = float(state.get("loss_scale", FP16_INIT_SCALE))
        c.scale_good_steps = int(state.get("scale_good_steps", 0))
        return c.step

    def export(self, concept_id: str, dest: str | Path, metrics: dict | None = None) -> Path:
        """Write the concept's adapter files (PEFT, diffusers, manifest) into ``dest``."""
        c = self.concepts[concept_id]
        manifest = AdapterManifest(
            concept_id=concept_id, trigger=c.job.trigger, stage=self.stage, steps=c.step,
            rank=self.bank.rank, alpha=self.bank.alpha, targets=[], base_fingerprint=self.fingerprint,
            max_sequence_length=c.job.recipe.max_sequence_length, mixed_precision=c.job.recipe.mixed_precision,
            metrics={**self.summary(concept_id), "loss_curve": c.curve.to_dict(), **(metrics or {})})
        emb = self.bank.slot_embeddings(c.slot, c.form) if c.form != "none" else None
        return export_slot(self.bank, self.bank.read_slot(c.slot), dest, manifest, emb=emb)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a recipe's ``mixed_precision`` on ``device`` (None: no autocast)."""
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def read_checkpoint_state(folder: str | Path) -> dict:
    """The ``state.json`` of a complete checkpoint whose tensors match their recorded sha256."""
    folder = Path(folder)
    path = folder / CKPT_STATE
    if not path.is_file() or not (folder / CKPT_TENSORS).is_file():
        raise CheckpointError(f"checkpoint {folder}: incomplete (needs {CKPT_STATE} and {CKPT_TENSORS})")
    state = json.loads(path.read_text())
    if sha256_file(folder / CKPT_TENSORS) != state.get("sha256"):
        raise CheckpointError(f"checkpoint {folder}: {CKPT_TENSORS} does not match its recorded sha256")
    return state
