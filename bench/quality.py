"""PureCC vs a plain DreamBooth LoRA on the pretrained world base, scored by the world reader.

For every training seed the five sample concepts are trained as one pack: stage 1 alone (the
DreamBooth LoRA baseline), and stage 1 with layer-wise concept embeddings; then stage 2 (PureCC):
as the paper describes it (embeddings from stage 1, the whole stage-1 model as extractor, adaptive
lambda* (A), or (C)); with the stage-1 extractor and with the bare base as extractor (lambda fixed at
1, the public code's default); and with the stage-1 extractor and each adaptive lambda* candidate
(A, B, C of purecc/losses.py). Every method is then scored on held-out prompts (never a reference
view) with fixed noise seeds, so that base and customised images of one prompt share their
starting noise:

- fidelity: the concept's object embedding vs its reference objects' (purecc.testbed.metrics);
- identity: the share of prompts where the reader sees the concept's look (shape, colour and
  pattern together) where it should stand;
- alignment: the share of the prompt's facts (shape, position, background, a second object) the
  reader sees;
- preservation (a): base on ``base_prompt`` vs customised on ``prompt``, same seed: the
  reader's facts outside the concept, and the PSNR of the pixels away from it;
- preservation (b): prompts without the trigger, base vs customised model (one concept
  loaded): alignment change, same-seed agreement, attribute-distribution distance; once on
  random world captions ("unrelated") and once on captions with the concept's class shape;
- composition: two concepts loaded at weight 1 each, both in one prompt.

Held-out prompts (``samples.held_out_prompts``) put each concept on a view no reference shows,
beside a second ordinary object, or in a relation to one. The tables (mean +/- standard deviation
over training seeds, each method's paired per-seed difference to DreamBooth with its 95% t
interval, and DreamBooth per concept against the references' own leave-one-out fidelity) go to
bench/RESULTS.md under "## Quality (bench/quality.py)" (other sections are kept), the grid to
bench/quality_grid.png.

    nice -n 19 python bench/quality.py                 # 3 seeds, the recipe below
    python bench/quality.py --methods dreambooth       # the baseline only
    python bench/quality.py --seeds 1 --train-only &   # train seeds in parallel processes first
    python bench/quality.py --quick                    # 1 seed, few steps: a smoke run
    python bench/quality.py --add --methods purecc-paper-eta1   # one more row, merged into the saved scores

The ablations of the paper's recipe run from the same stage-1 adapters: stage 2's eta (1, 0.5, 0.25,
0.1, and 0: a control without L_pure, not PureCC), each lambda* candidate with the embeddings ((B), (C),
and fixed lambda = 1), L_pure with no gradient through its base-caption branch (``detach_base``, ours;
at eta 2, 0.5 and 0.1, and at 0.1 with the embeddings trained further in stage 2), R taken against the
target caption without the trigger (``r_reference: class``, ours: R then carries what the concept adds
to its class word, not the class's shape or a background; fixed lambda = 1 at eta 1 and 0.25, detached),
lambda* (A) with a floor of 0.5 (ours; eta 0.1, detached), and eta 0.1 with stage 2 given stage 1's
budget (1000 steps x 4 where the seed gives 800 x 1). ``bench/lambda_trace.py`` shows what each lambda*
does along training.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from purecc.generate import RenderSettings, Sample, generate, load_concepts
from purecc.local_train import train_concepts
from purecc.model import ModelConfig, load_pipeline
from purecc.recipe import stage_recipe
from purecc.testbed import verify_world_base, world_base_path
from purecc.testbed.facts import caption_facts
from purecc.testbed.metrics import (concept_fidelity, concept_identity, concept_references, drift_unrelated,
                                    paired_interval, preservation_same_seed, text_alignment)
from purecc.testbed.reader import load_reader, object_embeddings, read_facts, world_metric_path
from purecc.testbed.samples import (CONCEPT_OBJECTS, PACKAGED_SAMPLES_DIR, SAMPLE_CONCEPTS, SampleConcept,
                                    held_out_prompts)
from purecc.testbed.world import BACKGROUNDS, POSITION_PHRASES, sample_scene, world_batch

ROOT = Path(__file__).resolve().parent.parent
RESULTS, GRID = ROOT / "bench" / "RESULTS.md", ROOT / "bench" / "quality_grid.png"
SCORES = ROOT / "bench" / "results" / "quality_scores.json"     # every method's per-seed scores
SECTION = "## Quality (bench/quality.py)"
NOISE_SEED0 = 50_000          # image noise seeds: the same for every model and training seed
UNRELATED_SEED = 424_242      # world captions for drift


@dataclass(frozen=True)
class Method:
    """A row of the table: stage 1 alone (DreamBooth) or stage 2 (PureCC) with its knobs."""

    name: str
    folder: str                   # under work/seed<s>/
    stage: int
    extractor: str = "stage1"
    lambda_mode: str = "fixed"
    embeddings: str = "none"      # "layerwise": stage 1 learns them, stage 2 uses that stage 1's
    eta: float = 2.0              # stage 2's weight of L_pure (the seed's 2 unless a row says otherwise)
    detach_base: bool = False     # stage 2 (ours): no gradient through L_pure's base-caption branch
    stage2_steps: int | None = None       # stage 2's steps and accumulation, where not the bench's (800 x 1)
    stage2_grad_accum: int | None = None
    train_embeddings: bool = False        # stage 2: stage 1's embeddings trained further (the recipe's default: frozen)
    r_reference: str = "empty"            # stage 2: R against "" (the paper's) or the class caption (ours)
    lambda_min: float = 0.0               # stage 2 (ours above 0): the adaptive lambda's floor
    stage2_precondition: bool = False     # stage 2 with stage 1's x0-parameterised loss (both terms)
    stage2_lr: float | None = None        # stage 2's learning rate, where not the bench's

    @property
    def is_default(self) -> bool:
        """Whether this is what ``purecc train``, batch specs and the demo run by default (both stages)."""
        s1, s2 = stage_recipe(1), stage_recipe(2)
        return (self.stage == 2 and self.embeddings == s1.embeddings == s2.embeddings
                and (self.extractor, self.lambda_mode) == (s2.extractor, s2.lambda_mode)
                and self.eta == s2.eta and self.detach_base == s2.detach_base
                and self.train_embeddings == s2.train_embeddings and self.r_reference == s2.r_reference
                and self.lambda_min == s2.lambda_min and self.stage2_precondition == s2.precondition
                and self.stage2_steps is None and self.stage2_grad_accum is None
                and (self.stage2_lr or BenchConfig.stage2_lr) == s2.lr)

    @property
    def stage2_overrides(self) -> dict:
        # detach_base always named: a row without it is the paper's gradient, whatever the recipe's default
        return {"eta": self.eta, "detach_base": self.detach_base,
                **({"train_embeddings": True} if self.train_embeddings else {}),
                **({"r_reference": self.r_reference} if self.r_reference != "empty" else {}),
                **({"lambda_min": self.lambda_min} if self.lambda_min else {}),
                **({"grad_accum": self.stage2_grad_accum} if self.stage2_grad_accum else {}),
                **({"precondition": True} if self.stage2_precondition else {}),
                **({"lr": self.stage2_lr} if self.stage2_lr else {})}

    @property
    def label(self) -> str:
        """The row's first cell: the name, marked ``(default)`` for the shipped recipe."""
        return f"{self.name} (default)" if self.is_default else self.name

    @property
    def stage1_folder(self) -> str:
        """The stage-1 run this method's stage 2 starts from (its extractor and embeddings)."""
        return "dreambooth" if self.embeddings == "none" else "dreambooth-emb"


METHODS = (Method("DreamBooth LoRA (stage 1)", "dreambooth", 1),
           Method("DreamBooth LoRA + layer-wise embeddings (stage 1)", "dreambooth-emb", 1, embeddings="layerwise"),
           Method("PureCC (paper): embeddings, extractor=stage1, adaptive λ, eta 2", "purecc-paper", 2, "stage1", "adaptive",
                  "layerwise"),
           Method("PureCC (paper), λ (C) extractor", "purecc-paper-extractor", 2, "stage1", "extractor",
                  "layerwise"),
           Method("PureCC (paper), λ (B) increment", "purecc-paper-increment", 2, "stage1", "increment",
                  "layerwise"),
           Method("PureCC (paper), fixed λ = 1", "purecc-paper-fixed", 2, "stage1", "fixed", "layerwise"),
           Method("PureCC (paper), eta 1", "purecc-paper-eta1", 2, "stage1", "adaptive", "layerwise", eta=1.0),
           Method("PureCC (paper), eta 0.5", "purecc-paper-eta05", 2, "stage1", "adaptive", "layerwise", eta=0.5),
           Method("PureCC (paper), eta 0.25", "purecc-paper-eta025", 2, "stage1", "adaptive", "layerwise", eta=0.25),
           Method("PureCC (paper), eta 0.1", "purecc-paper-eta01", 2, "stage1", "adaptive", "layerwise", eta=0.1),
           Method("stage 2 without L_pure (eta 0; a control, not PureCC)", "stage2-eta0", 2, "stage1", "adaptive",
                  "layerwise", eta=0.0),
           Method("PureCC (paper), base branch detached (ours)", "purecc-paper-detach", 2, "stage1", "adaptive",
                  "layerwise", detach_base=True),
           Method("PureCC (paper), eta 0.1, base branch detached (ours)", "purecc-paper-eta01-detach", 2, "stage1",
                  "adaptive", "layerwise", eta=0.1, detach_base=True),
           Method("PureCC (paper), eta 0.1, stage 2 at stage 1's budget (1000 x 4)", "purecc-paper-eta01-long", 2,
                  "stage1", "adaptive", "layerwise", eta=0.1, stage2_steps=1000, stage2_grad_accum=4),
           Method("PureCC (paper), eta 0.5, base branch detached (ours)", "purecc-paper-eta05-detach", 2, "stage1",
                  "adaptive", "layerwise", eta=0.5, detach_base=True),
           Method("PureCC (paper), eta 0.1, base branch detached, embeddings trained in stage 2",
                  "purecc-paper-eta01-detach-emb", 2, "stage1", "adaptive", "layerwise", eta=0.1, detach_base=True,
                  train_embeddings=True),
           Method("PureCC (paper), eta 0.1, base branch detached, λ* floor 0.5 (ours)",
                  "purecc-paper-eta01-detach-floor", 2, "stage1", "adaptive", "layerwise", eta=0.1, detach_base=True,
                  lambda_min=0.5),
           Method("PureCC (paper), eta 0.1, base branch detached, stage 1's x0 loss and lr 4e-4 in stage 2",
                  "purecc-paper-eta01-detach-x0", 2, "stage1", "adaptive", "layerwise", eta=0.1, detach_base=True,
                  stage2_precondition=True, stage2_lr=4e-4),
           Method("PureCC (paper), eta 0.1, base branch detached, stage 1's lr 4e-4 in stage 2",
                  "purecc-paper-eta01-detach-lr4", 2, "stage1", "adaptive", "layerwise", eta=0.1, detach_base=True,
                  stage2_lr=4e-4),
           Method("PureCC, R against the class caption (ours), fixed λ = 1, eta 1, base branch detached",
                  "purecc-classr-fixed-eta1", 2, "stage1", "fixed", "layerwise", eta=1.0, detach_base=True,
                  r_reference="class"),
           Method("PureCC, R against the class caption (ours), fixed λ = 1, eta 0.25, base branch detached",
                  "purecc-classr-fixed-eta025", 2, "stage1", "fixed", "layerwise", eta=0.25, detach_base=True,
                  r_reference="class"),
           Method("PureCC, extractor=stage1", "purecc-stage1", 2, "stage1"),
           Method("PureCC, extractor=base", "purecc-base", 2, "base"),
           Method("PureCC, extractor=stage1, adaptive λ", "purecc-stage1-adaptive", 2, "stage1", "adaptive"),
           Method("PureCC, extractor=stage1, λ (B) increment", "purecc-stage1-increment", 2, "stage1", "increment"),
           Method("PureCC, extractor=stage1, λ (C) extractor", "purecc-stage1-extractor", 2, "stage1", "extractor"))


@dataclass(frozen=True)
class BenchConfig:
    """The seed's recipes (METHOD.md, recipe.py) with only the resolution changed to 64 px."""

    seeds: tuple[int, ...] = (0, 1, 2)
    stage1_steps: int = 1000      # x grad_accum 4, batch 1 per concept
    stage1_lr: float = 4e-4
    stage2_steps: int = 800       # batch 1 per concept
    stage2_lr: float = 1e-4
    render_steps: int = 20
    guidance: float = 5.0
    concept_prompts: int = 12     # per concept: views, pairs and relations in turn
    drift_prompts: int = 16       # per set (unrelated, class word)
    composition_prompts: int = 4  # per pair of concepts


QUICK = BenchConfig(seeds=(0,), stage1_steps=30, stage2_steps=30, render_steps=8,
                    concept_prompts=3, drift_prompts=3, composition_prompts=1)


# ---------------------------------------------------------------- prompts

def concept_prompts(c: SampleConcept, n: int) -> list[tuple[str, str, str]]:
    """(prompt, base_prompt, position) in contexts the references never show."""
    return [(p.prompt, p.base_prompt, p.position) for p in held_out_prompts(c, n)]


def unrelated_prompts(n: int) -> list[str]:
    return [caption for _, caption, _ in world_batch(UNRELATED_SEED, n)]


def class_prompts(shape: str, n: int) -> list[str]:
    """World captions in which at least one object has the concept's class shape."""
    rng, out = random.Random(f"bench/class/{shape}"), []
    while len(out) < n:
        scene = sample_scene(rng)
        if any(o.shape == shape for o in scene.objects):
            out.append(scene.caption())
    return out


def composition_prompts(a: SampleConcept, b: SampleConcept, n: int) -> list[tuple[str, tuple[str, str]]]:
    """(prompt, (position of a, position of b)): the two concepts side by side or stacked."""
    rng = random.Random(f"bench/compose/{a.concept_id}/{b.concept_id}")
    layouts = (("left", "right"), ("top", "bottom"), ("right", "left"), ("bottom", "top"))
    out = []
    for i in range(n):
        pa, pb = layouts[i % len(layouts)]
        bg = rng.choice(BACKGROUNDS)
        prompt = (f"a {a.trigger_word} {a.class_word} {POSITION_PHRASES[pa]} and a {b.trigger_word} "
                  f"{b.class_word} {POSITION_PHRASES[pb]}, on a {bg} background")
        out.append((prompt, (pa, pb)))
    return out


# ---------------------------------------------------------------- training

TRAIN_KEEP = {"resolution": 64, "checkpoint_every": 10 ** 6}    # every bench run: 64 px, no mid-run checkpoint


def sample_concept_specs() -> list[tuple[str, str, str]]:
    """The five sample concepts as ``train_concepts`` takes them: (id, trigger, manifest)."""
    return [(c.concept_id, c.trigger_word, str(PACKAGED_SAMPLES_DIR / c.concept_id / "manifest.csv"))
            for c in SAMPLE_CONCEPTS]


def copy_stage1(src: Path, dst: Path, concept_id: str) -> None:
    """Copy one concept's stage-1 adapter from run ``src`` to run ``dst`` (the stage-2 run's extractor).

    Without the writers' temporary files: another bench process reusing the same stage-1 run re-exports
    it (atomic renames) and its temp files come and go while this copies."""
    shutil.copytree(src / concept_id / "stage1", dst / concept_id / "stage1", ignore=shutil.ignore_patterns(".*.tmp"))


def train_methods(base: Path, work: Path, seed: int, cfg: BenchConfig,
                  methods: Sequence[Method] = METHODS) -> dict[str, list[Path]]:
    """Train every method for one seed (finished runs are reused); method name -> adapter folders.

    Stage 1 is trained once; each PureCC variant gets its own folder holding a copy of the
    stage-1 adapters (its extractor) and its stage-2 adapters."""
    ids = [c.concept_id for c in SAMPLE_CONCEPTS]
    common = dict(model=str(base), concepts=sample_concept_specs(), seed=seed, progress=False)
    keep = TRAIN_KEEP
    out = {}
    needed = {m.folder for m in methods if m.stage == 1} | {m.stage1_folder for m in methods if m.stage == 2}
    for m in (m for m in METHODS if m.stage == 1 and m.folder in needed):
        stage1 = work / f"seed{seed}" / m.folder
        train_concepts(out=stage1, stages=(1,), steps={1: cfg.stage1_steps},
                       overrides={**keep, "lr": cfg.stage1_lr, "embeddings": m.embeddings}, **common)
        out[m.name] = [stage1 / i / "stage1" for i in ids]
    for m in (m for m in methods if m.stage == 2):
        run, stage1 = work / f"seed{seed}" / m.folder, work / f"seed{seed}" / m.stage1_folder
        for i in ids:
            if not (run / i / "stage1").is_dir():
                copy_stage1(stage1, run, i)
        # a row's own budget holds at the bench's default steps; --quick or --stage2-steps set every row's
        own = m.stage2_steps and cfg.stage2_steps == BenchConfig.stage2_steps
        train_concepts(out=run, stages=(2,), steps={2: m.stage2_steps if own else cfg.stage2_steps},
                       overrides={**keep, "lr": cfg.stage2_lr, "embeddings": m.embeddings, **m.stage2_overrides},
                       extractor=m.extractor, lambda_mode=m.lambda_mode, **common)
        out[m.name] = [run / i / "stage2" for i in ids]
    return {m.name: out[m.name] for m in methods}


# ---------------------------------------------------------------- rendering and scoring

class Scorer:
    """Renders prompt sets with one model and scores them against the base's renderings."""

    def __init__(self, base: Path, reader, cfg: BenchConfig):
        self.base, self.reader, self.cfg = base, reader, cfg
        self.settings = RenderSettings(steps=cfg.render_steps, guidance=cfg.guidance, width=64, height=64)
        self.refs = {c.concept_id: concept_references(PACKAGED_SAMPLES_DIR / c.concept_id / "manifest.csv")
                     for c in SAMPLE_CONCEPTS}
        self.sets = {c.concept_id: {"concept": concept_prompts(c, cfg.concept_prompts),
                                    "class": class_prompts(c.class_word, cfg.drift_prompts)}
                     for c in SAMPLE_CONCEPTS}
        self.unrelated = unrelated_prompts(cfg.drift_prompts)
        self.pairs = [(a, b, composition_prompts(a, b, cfg.composition_prompts))
                      for a, b in combinations(SAMPLE_CONCEPTS, 2)]
        self.pipe = load_pipeline(ModelConfig(path=str(base)))
        self.base_images = self._render_base()

    def render(self, prompts: Sequence[str], concepts: Sequence[tuple[tuple[str, float], ...]] = (),
               slot_of: dict | None = None) -> list[Image.Image]:
        concepts = list(concepts) or [()] * len(prompts)
        samples = [Sample(p, NOISE_SEED0 + i, cs) for i, (p, cs) in enumerate(zip(prompts, concepts))]
        out = []
        for i in range(0, len(samples), 32):
            out += generate(self.pipe, samples[i:i + 32], slot_of or {}, self.settings)
        return out

    def _render_base(self) -> dict:
        imgs: dict = {"unrelated": self.render(self.unrelated)}
        for cid, sets in self.sets.items():
            imgs[cid, "base_prompt"] = self.render([bp for _, bp, _ in sets["concept"]])
            imgs[cid, "prompt"] = self.render([p for p, _, _ in sets["concept"]])
            imgs[cid, "class"] = self.render(sets["class"])
        for a, b, prompts in self.pairs:
            imgs[a.concept_id, b.concept_id] = self.render([p for p, _ in prompts])
        return imgs

    def fidelity(self, cid: str, images, positions) -> np.ndarray:
        refs, ref_pos = self.refs[cid]
        return concept_fidelity(self.reader, images, positions, refs, ref_pos)

    def base_row(self) -> dict[str, float]:
        """The base model with the trigger prompts: the floor of fidelity, and its alignment."""
        fid, align, comp = [], [], []
        for cid, sets in self.sets.items():
            imgs = self.base_images[cid, "prompt"]
            fid.append(self.fidelity(cid, imgs, [pos for *_, pos in sets["concept"]]).mean())
            align.append(text_alignment(self.reader, imgs, [p for p, _, _ in sets["concept"]]).mean())
        for a, b, prompts in self.pairs:
            imgs = self.base_images[a.concept_id, b.concept_id]
            comp.append(np.mean([self.fidelity(c.concept_id, imgs, [pos[k] for _, pos in prompts]).mean()
                                 for k, c in enumerate((a, b))]))
        return {"fidelity": float(np.mean(fid)), "alignment": float(np.mean(align)),
                "composition_fidelity": float(np.mean(comp))}

    def base_fact_recall(self, n: int = 64) -> dict[str, float]:
        """Per fact kind, the share the base draws as asked, on ``n`` fresh world captions."""
        captions = unrelated_prompts(n + len(self.unrelated))[len(self.unrelated):]
        seen = read_facts(self.reader, self.render(captions))
        hits: dict[str, list[bool]] = {}
        for s, c in zip(seen, captions):
            for k, v in caption_facts(c).items():
                hits.setdefault(k.split(".")[-1], []).append(s.get(k) == v)
        return {k: float(np.mean(v)) for k, v in sorted(hits.items())}

    def reference_ceiling(self) -> dict[str, float]:
        """Per concept, the leave-one-out fidelity of its reference images among themselves."""
        vals = {}
        for cid, (refs, pos) in self.refs.items():
            emb = object_embeddings(self.reader, refs, pos)
            sim = emb @ emb.t()
            n = len(refs)
            vals[cid] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
        return vals

    def score_method(self, folders: Sequence[Path]) -> tuple[dict[str, float], dict]:
        """All metrics of one method (one adapter per concept); also returns its images."""
        self.pipe = load_pipeline(ModelConfig(path=str(self.base)))
        slot_of = load_concepts(self.pipe, list(folders)).slot_of
        m: dict[str, list[float]] = {}
        imgs: dict = {}
        add = lambda k, v: m.setdefault(k, []).append(float(v))  # noqa: E731
        for cid, sets in self.sets.items():
            one = ((cid, 1.0),)
            prompts, positions = [p for p, _, _ in sets["concept"]], [pos for *_, pos in sets["concept"]]
            imgs[cid, "prompt"] = self.render(prompts, [one] * len(prompts), slot_of)
            fid = self.fidelity(cid, imgs[cid, "prompt"], positions).mean()
            ident = concept_identity(self.reader, imgs[cid, "prompt"], positions, CONCEPT_OBJECTS[cid].look).mean()
            add("fidelity", fid)
            add("identity", ident)
            add(f"fidelity/{cid}", fid)
            add(f"identity/{cid}", ident)
            add("alignment", text_alignment(self.reader, imgs[cid, "prompt"], prompts).mean())
            pres = preservation_same_seed(self.reader, self.base_images[cid, "base_prompt"], imgs[cid, "prompt"],
                                          [[p] for p in positions])
            add("pres_agreement", pres["context_agreement"].mean())
            add("pres_psnr", pres["context_psnr"].mean())
            for name, prompts_b, base_key in (("unrelated", self.unrelated, "unrelated"),
                                              ("class", sets["class"], (cid, "class"))):
                imgs[cid, name] = self.render(prompts_b, [one] * len(prompts_b), slot_of)
                d = drift_unrelated(self.reader, self.base_images[base_key], imgs[cid, name], prompts_b)
                add(f"{name}_dalign", d["alignment_delta"])
                add(f"{name}_agreement", d["same_seed_agreement"])
                add(f"{name}_tv", d["attribute_tv"])
        for a, b, prompts in self.pairs:
            both = ((a.concept_id, 1.0), (b.concept_id, 1.0))
            key = (a.concept_id, b.concept_id)
            imgs[key] = self.render([p for p, _ in prompts], [both] * len(prompts), slot_of)
            add("composition_fidelity", np.mean([self.fidelity(c.concept_id, imgs[key], [pos[k] for _, pos in prompts]
                                                               ).mean() for k, c in enumerate((a, b))]))
            add("composition_alignment", text_alignment(self.reader, imgs[key], [p for p, _ in prompts]).mean())
        return {k: float(np.mean(v)) for k, v in m.items()}, imgs


# ---------------------------------------------------------------- report

COLUMNS_A = (("fidelity", "fidelity ↑"), ("alignment", "alignment ↑"),
             ("pres_agreement", "(a) context facts kept ↑"), ("pres_psnr", "(a) context PSNR dB ↑"),
             ("composition_fidelity", "2-concept fidelity ↑"), ("composition_alignment", "2-concept alignment ↑"),
             ("identity", "identity ↑"))
COLUMNS_B = (("unrelated_dalign", "unrelated: Δ alignment"),
             ("unrelated_agreement", "unrelated: same-seed facts kept ↑"), ("unrelated_tv", "unrelated: attribute TV ↓"),
             ("class_dalign", "class word: Δ alignment"),
             ("class_agreement", "class word: same-seed facts kept ↑"), ("class_tv", "class word: attribute TV ↓"))


def _cell(values: Sequence[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table(columns, rows: dict[str, list[dict[str, float]]], extra: dict[str, dict[str, str]]) -> str:
    head = "| method | " + " | ".join(t for _, t in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for name, extra_row in extra.items():
        lines.append(f"| {name} | " + " | ".join(extra_row.get(k, "–") for k, _ in columns) + " |")
    for name, per_seed in rows.items():
        digits = lambda k: 1 if k.endswith("psnr") else 3  # noqa: E731
        lines.append(f"| {name} | " + " | ".join(_cell([r[k] for r in per_seed], digits(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


PAIRED = (("fidelity", "fidelity"), ("alignment", "alignment"), ("pres_agreement", "(a) facts kept"),
          ("pres_psnr", "(a) PSNR dB"), ("unrelated_agreement", "(b) unrelated kept"),
          ("class_agreement", "(b) class word kept"), ("composition_alignment", "2-concept alignment"))


def paired_table(rows: dict[str, list[dict[str, float]]], reference: str) -> str:
    """Each method minus ``reference``, per training seed: mean [95% interval]; * where it excludes 0."""
    head = f"| method − {reference} | " + " | ".join(t for _, t in PAIRED) + " |"
    lines = [head, "|" + "---|" * (len(PAIRED) + 1)]
    for name, per_seed in rows.items():
        if name == reference:
            continue
        cells = []
        for k, _ in PAIRED:
            mean, lo, hi = paired_interval([r[k] for r in per_seed], [r[k] for r in rows[reference]])
            digits = 1 if k.endswith("psnr") else 3
            star = "*" if lo > 0 or hi < 0 else ""
            cells.append(f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{star}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def concept_table(rows: dict[str, list[dict[str, float]]], ceiling: dict[str, float], target: float = 0.85) -> str:
    """Per sample concept: the references' leave-one-out fidelity and each method's fidelity (its
    share of that ceiling) and identity, means over seeds; ✓ where fidelity >= ``target`` x ceiling
    and identity >= 0.7."""
    lines = ["| method | " + " | ".join(ceiling) + " |", "|" + "---|" * (len(ceiling) + 1),
             "| references (leave-one-out) | " + " | ".join(f"{v:.3f}" for v in ceiling.values()) + " |"]
    for name, per_seed in rows.items():
        cells = []
        for cid, ref in ceiling.items():
            fid = float(np.mean([r[f"fidelity/{cid}"] for r in per_seed]))
            ident = float(np.mean([r[f"identity/{cid}"] for r in per_seed]))
            ok = " ✓" if fid >= target * ref and ident >= 0.7 else ""
            cells.append(f"{fid:.3f} ({fid / ref:.2f}x), identity {ident:.2f}{ok}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GRID_PAIRS = 4  # composition columns in the grid (the tables score every pair)


def grid_image(scorer: Scorer, method_imgs: dict[str, dict], path: Path, scale: int = 2) -> Path:
    """Rows: references, base, each method. Columns per concept: two concept prompts and one
    class-word prompt; then one composition for each of the first ``GRID_PAIRS`` pairs."""
    cols: list[tuple] = []
    for c in SAMPLE_CONCEPTS:
        cols += [(c.concept_id, "prompt", 0), (c.concept_id, "prompt", 1), (c.concept_id, "class", 0)]
    cols += [(a.concept_id, b.concept_id, 0) for a, b, _ in scorer.pairs[:GRID_PAIRS]]
    rows = [("references", {(cid, "prompt"): scorer.refs[cid][0] for cid in scorer.refs}),
            ("base", scorer.base_images), *method_imgs.items()]
    tile, label_w = 64 * scale, 240
    canvas = Image.new("RGB", (label_w + tile * len(cols), tile * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (name, imgs) in enumerate(rows):
        draw.text((4, r * tile + tile // 2 - 6), name.replace("λ", "lambda"), fill=(0, 0, 0))
        for c, (k1, k2, i) in enumerate(cols):
            seq = imgs.get((k1, k2))
            if seq is not None and i < len(seq):
                canvas.paste(seq[i].resize((tile, tile), Image.Resampling.NEAREST), (label_w + c * tile, r * tile))
    # An octree palette keeps the colours (and the committed file small, ~100 KB).
    canvas.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def write_section(path: Path, body: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it), keeping all others."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[nxt + 1:] if nxt >= 0 else "")
    path.write_text(text)


# ---------------------------------------------------------------- main

def run(cfg: BenchConfig, work: Path, write: bool, base: Path | None = None, reader_dir: Path | None = None,
        methods: Sequence[Method] = METHODS, threads: int = 1, add: bool = False, record_path: Path = SCORES) -> str:
    """Train and score ``methods``; ``add``: score only those the saved record lacks and merge them into it
    (same config; the grid is left as it is). A ``record_path`` other than the committed record is a side run:
    it is written there, and RESULTS.md and the grid are left alone."""
    t0 = time.monotonic()
    torch.set_num_threads(threads)
    base = base or world_base_path()
    verify_world_base(base)
    reader = load_reader(reader_dir)
    saved = None
    if add:
        saved = json.loads(record_path.read_text())
        if saved["config"] != json.loads(json.dumps(asdict(cfg))):
            raise SystemExit(f"--add: the saved scores were made with config {saved['config']}, not {asdict(cfg)}")
        methods = [m for m in methods if m.folder not in saved["methods"]]
        if not methods:
            raise SystemExit("--add: every method named is in the saved scores already")
    timings: dict[str, float] = {}
    folders = {}
    for seed in cfg.seeds:
        t = time.monotonic()
        folders[seed] = train_methods(base, work, seed, cfg, methods)
        timings[f"train seed {seed}"] = time.monotonic() - t
        print(f"trained seed {seed} in {timings[f'train seed {seed}']:.0f} s", file=sys.stderr)
    t = time.monotonic()
    scorer = Scorer(base, reader, cfg)
    rows: dict[str, list[dict[str, float]]] = {m.name: [] for m in methods}
    grid_imgs = {}
    for seed in cfg.seeds:
        for method in (m.name for m in methods):
            scores, imgs = scorer.score_method(folders[seed][method])
            rows[method].append(scores)
            if seed == cfg.seeds[0]:
                grid_imgs[method] = imgs
            print(f"seed {seed} {method}: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if "/" not in k),
                  file=sys.stderr)
    timings["score"] = time.monotonic() - t
    command = " ".join(["python bench/quality.py", *sys.argv[1:]])
    if saved is not None:
        done = set(saved["methods"]) | {m.folder for m in methods}
        record = {**saved, "command": f"{saved['command']}`, then `{command}",
                  "methods": [m.folder for m in METHODS if m.folder in done],
                  "scores": {**saved["scores"], **rows},
                  "timings": {**saved["timings"], **{f"{k} (added)": v for k, v in timings.items()}},
                  "total": saved["total"] + time.monotonic() - t0}
    else:
        record = {"command": command, "config": asdict(cfg),
                  "threads": threads, "methods": [m.folder for m in methods], "scores": rows,
                  "base_row": scorer.base_row(), "ceiling": scorer.reference_ceiling(),
                  "setup": setup_lines(base, reader_dir, scorer.base_fact_recall()),
                  "timings": timings, "total": time.monotonic() - t0}
    body = report_from(record)
    if write:
        record_path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        if record_path == SCORES:
            if saved is None:
                grid_image(scorer, grid_imgs, GRID)
            write_section(RESULTS, body)
    return body


def report_from(record: dict) -> str:
    """The RESULTS.md section from a scoring run's record (``--report-only`` rebuilds it from SCORES, so
    that the ``(default)`` mark follows the recipe shipped now)."""
    methods = [m for m in METHODS if m.folder in record["methods"]]
    rows = {m.label: record["scores"][m.name] for m in methods}
    ceiling, base_row = record["ceiling"], record["base_row"]
    extra_a = {"reference images (leave-one-out)": {"fidelity": f"{np.mean(list(ceiling.values())):.3f}"},
               "base model, trigger prompts": {k: f"{v:.3f}" for k, v in base_row.items()}}
    extra_b = {"base model (by definition)": {k: ("0" if not k.endswith("agreement") else "1")
                                              for k, _ in COLUMNS_B}}
    return report(BenchConfig(**{**record["config"], "seeds": tuple(record["config"]["seeds"])}), record["setup"],
                  rows, extra_a, extra_b, ceiling, record["timings"], record["total"], record["threads"],
                  record["command"])


def setup_lines(base: Path, reader_dir: Path | None, recall: dict[str, float]) -> list[str]:
    """What the world base and the reader are, with the numbers that say how far to trust them."""
    pre = json.loads((base / "pretrain.json").read_text())
    acc = json.loads(((reader_dir or world_metric_path()) / "reader.json").read_text())["report"]["accuracy_clean"]
    c = pre["config"]
    first_run = ("; the committed base's first run is `bench/results/world_base_4x_gpu_run1_pretrain.json`"
                 if base.resolve() == world_base_path().resolve() else "")
    continued = f" continuing an earlier run's base (`--init`{first_run})" if c.get("init") else ""
    return [
        f"World base: {c['steps']} transformer steps (batch {c['batch']}) and {c['vae_steps']}+"
        f"{c['vae_full_steps']} VAE steps on {c['images']} world images{continued}, "
        f"{pre['seconds']['total'] / 60:.1f} min on {pre['device_name']}. "
        "What it draws for fresh world captions (share of facts the reader sees as asked; "
        "chance is about 1/7 background, 1/6 shape, 1/7 colour, 1/4 pattern, 1/2 size): "
        + ", ".join(f"{k} {v:.2f}" for k, v in recall.items()) + ".",
        "World reader accuracy on fresh world renders: " + ", ".join(
            f"{k} {v:.3f}" for k, v in sorted(acc.items()) if k != "all_facts") + ".", ""]


def report(cfg: BenchConfig, setup: list[str], rows, extra_a, extra_b, ceiling: dict[str, float],
           timings: dict[str, float], total: float, threads: int = 1, command: str = "python bench/quality.py") -> str:
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    reference = METHODS[0].label
    paired = (["### Paired per-seed differences to DreamBooth", "",
               f"Mean over training seeds of (method − DreamBooth) on the same seed, with its 95% t interval; "
               f"`*` where the interval excludes 0 ({len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}).", "",
               paired_table(rows, reference), ""] if len(rows) > 1 else [])
    default = next((name for name in rows if name.endswith("(default)")), None)
    if default is not None and len(rows) > 2:   # the rule picks the default among the rows: how each compares
        paired += ["### Paired per-seed differences to the default", "",
                   "Mean over training seeds of (method − the shipped default) on the same seed, with its 95% t "
                   "interval; `*` where the interval excludes 0.", "",
                   paired_table(rows, default), ""]
    return "\n".join([
        SECTION, "", *setup,
        f"`{command}` on the committed world base (`purecc/testbed/assets/world-base`), "
        f"scored by the committed world reader (`purecc/testbed/assets/world-metric`). "
        f"Config: `{asdict(cfg)}`. Wall time {total / 60:.1f} min on this machine ({times}), "
        f"{threads} CPU thread{'s' if threads > 1 else ''} (training: 1 per process), torch {torch.__version__}. Mean ± standard deviation over the "
        f"{len(cfg.seeds)} training seeds (each cell first averaged over the {len(SAMPLE_CONCEPTS)} sample "
        f"concepts and their {cfg.concept_prompts} held-out prompts each; 2-concept columns over the "
        f"{len(SAMPLE_CONCEPTS) * (len(SAMPLE_CONCEPTS) - 1) // 2} pairs).", "",
        "### Concept, alignment, preservation (a), composition", "",
        table(COLUMNS_A, rows, extra_a), "",
        "### Preservation (b): prompts without the trigger, one concept loaded", "",
        table(COLUMNS_B, rows, extra_b), "",
        *paired,
        "### Per concept (means over seeds)", "",
        "Fidelity with its share of the references' own leave-one-out fidelity, and identity; ✓ where "
        "fidelity >= 0.85x the references' and identity >= 0.70.", "",
        concept_table(rows, ceiling), "",
        "![grid](quality_grid.png)", "",
        "Grid (training seed %d): rows are the reference images, the base model and each method; "
        "columns per concept are two held-out concept prompts and one class-word prompt without the "
        "trigger, then one two-concept prompt per pair." % cfg.seeds[0], "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/quality.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--stage1-steps", type=int, default=None)
    parser.add_argument("--stage2-steps", type=int, default=None)
    parser.add_argument("--stage1-lr", type=float, default=None)
    parser.add_argument("--stage2-lr", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps and prompts (smoke run)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality",
                        help="where adapters are trained (finished runs are reused)")
    parser.add_argument("--base", type=Path, default=None, help="model folder (default: the world base)")
    parser.add_argument("--reader", type=Path, default=None, help="reader folder (default: the packaged one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (scoring)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the RESULTS.md section from the last run's bench/results/quality_scores.json")
    parser.add_argument("--no-write", action="store_true", help="print the section; leave RESULTS.md alone")
    parser.add_argument("--train-only", action="store_true",
                        help="train the seeds' adapters into --work and stop (several such runs can share "
                             "the cores; a later run reuses what they trained)")
    parser.add_argument("--add", action="store_true",
                        help="score only the --methods that bench/results/quality_scores.json lacks and merge them "
                             "into it (same config; the grid is kept)")
    parser.add_argument("--scores", type=Path, default=SCORES,
                        help="the record to write (and --add to); another path than the default is a side run "
                             "that leaves RESULTS.md and the grid alone")
    parser.add_argument("--methods", nargs="+", choices=[m.folder for m in METHODS], default=None,
                        help="train and score only these (DreamBooth, the reference, is always included)")
    args = parser.parse_args(argv)
    if args.report_only:
        body = report_from(json.loads(args.scores.read_text()))
        if args.scores.resolve() == SCORES:
            write_section(RESULTS, body)
        else:
            print(body)
        return 0
    cfg = QUICK if args.quick else BenchConfig()
    over = {k: v for k, v in (("seeds", tuple(args.seeds) if args.seeds else None),
                              ("stage1_steps", args.stage1_steps), ("stage2_steps", args.stage2_steps),
                              ("stage1_lr", args.stage1_lr), ("stage2_lr", args.stage2_lr)) if v}
    cfg = replace(cfg, **over)
    methods = [m for m in METHODS if m is METHODS[0] or args.methods is None or m.folder in args.methods]
    if args.train_only:
        torch.set_num_threads(1)
        for seed in cfg.seeds:
            train_methods(args.base or world_base_path(), args.work, seed, cfg, methods)
        return 0
    print(run(cfg, args.work, write=not (args.no_write or args.quick), base=args.base, reader_dir=args.reader,
              methods=methods, threads=args.threads, add=args.add, record_path=args.scores.resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
