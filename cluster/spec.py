"""Batch specs: a YAML or JSON file listing concepts to train, validated as a whole before anything runs.

A batch names the base model, the storage root (a local folder or an ``s3://``/``gs://`` URI), the
resources, optional recipe defaults and the concepts. Relative paths resolve against the batch
file's folder. Every problem is collected (schema, manifests, recipes, duplicates, base model) and
raised once as a ``BatchSpecError`` naming the file, the concept and the field of each.

These models are the one batch schema: the HTTP API's batch models (``services.schemas``) subclass
them and re-declare only the fields whose bounds are tighter there (its request is ``BatchSpec``
less the fields the service fixes). Validation parses
each concept manifest once; ``ValidatedBatch`` keeps the parsed manifests so that planning the
jobs (``jobs()``, which hashes the data) reads none of them again.

    name: shapes-v1
    base_model: ./models/sd35m
    storage: ./runs/shapes            # or s3://bucket/prefix (then `ledger:` must be a local path)
    resources: {gpus_per_worker: 1, gpu_memory_gib: 80, max_concurrent: 2, priority: 1}  # pack size: cluster.policy
    defaults: {resolution: 512, stage1: {steps: 1000}, stage2: {steps: 800}}
    concepts:
      - id: checkered-star
        data: data/checkered-star/manifest.csv
        trigger: zqx
        overrides: {lambda_mode: adaptive, validation_prompts: ["a [v] star on a beach"]}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from purecc.data import ConceptManifest, ManifestError, read_concept_manifest
from purecc.ids import CONCEPT_ID_PATTERN, TRIGGER_PATTERN
from purecc.model import ModelFolderError, read_model_index
from purecc.recipe import EmbeddingForm, LambdaMode, StageFields, StageRecipe, stage_recipe

ConceptId = Annotated[str, StringConstraints(pattern=CONCEPT_ID_PATTERN)]
Trigger = Annotated[str, StringConstraints(pattern=TRIGGER_PATTERN)]
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=500)]
URI_SCHEMES = ("s3://", "gs://", "file://")
MAX_CONCEPTS = 1000


class _Strict(BaseModel):
    """Unknown fields are errors; a validated model does not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StageOverrides(StageFields):
    """Per-stage knobs; unset fields keep the seed recipe (``purecc.recipe.stage_recipe``). The same model
    as a stage of ``purecc train --recipe``/``--set`` (``purecc.recipe.StageFields``), so a recipe that
    trains locally is a valid batch recipe, field for field."""


class Overrides(_Strict):
    """Recipe overrides of one concept (or batch-wide defaults under ``defaults:``)."""

    resolution: int | None = Field(None, ge=16, le=4096, multiple_of=16, description="training resolution")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Seed of data order, noise and init.")
    embeddings: EmbeddingForm | None = Field(None, description="Concept embeddings: none, layerwise (one "
                                             "learned vector per transformer block at the trigger's tokens), or "
                                             "clip-token (a learned token in CLIP-L and CLIP-G).")
    eta: float | None = Field(None, ge=0, description="stage 2: weight of L_pure")
    lambda_mode: LambdaMode | None = Field(None, description="Stage 2: how lambda* is chosen (fixed, "
                                                            "adaptive, increment or extractor).")
    extractor: Literal["stage1", "base"] | None = Field(None, description="Stage 2: the frozen extractor "
                                                        "(base + the stage-1 LoRA, or the base alone).")
    validation_prompts: list[Prompt] | None = Field(
        None, max_length=16, description="rendered at the end of each stage; [v] becomes the trigger")
    stage1: StageOverrides = StageOverrides()
    stage2: StageOverrides = StageOverrides()

    def merged_over(self, base: "Overrides") -> "Overrides":
        """These overrides on top of ``base`` (field by field, stage sections too)."""
        data = base.model_dump(exclude_none=True)
        mine = self.model_dump(exclude_none=True)
        for stage in ("stage1", "stage2"):
            mine[stage] = {**data.get(stage, {}), **mine.get(stage, {})}
        return Overrides(**{**data, **mine})


class Resources(_Strict):
    """How runs are placed on the cluster. Each pack is one Ray Train run with one worker."""

    gpus_per_worker: float = Field(0.0, ge=0, le=8, description="GPUs per training worker (0: CPU; a fraction "
                                                                "lets several packs share one GPU).")
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="CPUs per training worker "
                                   "(a fraction such as 0.5 on a laptop)")
    gpu_memory_gib: float | None = Field(None, gt=0, le=1024, description="memory of one GPU (GiB); with "
                                         "gpus_per_worker it sizes packs from the memory model (cluster.policy)")
    concepts_per_pack: int | None = Field(None, ge=1, le=64, description="concepts trained together on one "
                                          "worker; unset: from the memory model (cluster.policy.pack_size)")
    max_concurrent: int = Field(2, ge=1, le=1024, description="this batch's training runs at the same time "
                                "(other batches have their own limits)")
    priority: int = Field(1, ge=1, le=100, description="fair-share weight against other batches and owners: "
                          "a batch of priority 4 gets 4x the run slots of one of priority 1 while both wait")
    max_failures: int = Field(1, ge=1, le=100, description="worker restarts per run (Ray Train "
                              "FailureConfig); a restarted worker resumes from its last checkpoint")
    max_attempts: int = Field(2, ge=1, le=100, description="failed runs per job stage before the job "
                              "is marked failed (a failed pack is retried one concept per run)")

    @model_validator(mode="after")
    def _memory_needs_a_gpu(self) -> "Resources":
        if self.gpu_memory_gib is not None and self.gpus_per_worker <= 0:
            raise ValueError("gpu_memory_gib is set but gpus_per_worker is 0 (a CPU worker has no GPU memory); "
                             "set gpus_per_worker or drop gpu_memory_gib")
        return self


class ValidationRender(_Strict):
    """How the validation images at the end of each stage are rendered."""

    steps: int = Field(20, ge=1, le=200, description="denoising steps of validation images")
    guidance: float = Field(4.0, ge=0, le=30, description="classifier-free guidance scale")


class ConceptSpec(_Strict):
    """One concept to train: its id, its data and its trigger word."""

    id: ConceptId = Field(description="Concept id: [a-z0-9][a-z0-9_-]{0,63}; the published adapter's id in the "
                                      "registry.")
    data: str = Field(min_length=1, description="concept manifest (CSV or Parquet)")
    trigger: Trigger = Field(description="Trigger word substituted for [v] in the prompts.")
    overrides: Overrides = Overrides()


class BatchSpec(_Strict):
    """A batch file's content: the concepts to train, on which base, into which storage, how."""

    name: ConceptId = Field("batch", description="batch name (same rule as concept ids)")
    base_model: str = Field(min_length=1, description="local diffusers SD3/SD3.5 folder")
    storage: str = Field(min_length=1, description="storage root: folder or s3:// / gs:// URI")
    ledger: str | None = Field(None, description="job ledger: a local SQLite file (default "
                               "<storage>/ledger.sqlite) or postgresql://user@host/db for a cluster")
    resources: Resources = Resources()
    defaults: Overrides = Overrides()
    validation: ValidationRender = ValidationRender()
    concepts: list[ConceptSpec] = Field(min_length=1, max_length=MAX_CONCEPTS)

    @property
    def ledger_path(self) -> str:
        """The job ledger: ``ledger`` (a path or a postgresql:// URL), else ``<storage>/ledger.sqlite``."""
        return self.ledger or f"{self.storage}/ledger.sqlite"

    def jobs(self, manifests: Mapping[str, ConceptManifest] | None = None) -> list["JobSpec"]:
        """One job per concept: everything a driver needs, content-hashed. ``manifests`` (concept id
        -> manifest, as validation parsed them) are used instead of reading those manifests again."""
        base_id = model_identity(self.base_model)
        out = []
        for c in self.concepts:
            ov = c.overrides.merged_over(self.defaults)
            manifest = (manifests or {}).get(c.id)
            if manifest is None or manifest.path != Path(c.data) or manifest.trigger != c.trigger:
                manifest = read_concept_manifest(c.data, c.trigger)
            out.append(JobSpec(
                concept_id=c.id, batch=self.name, trigger=c.trigger, manifest=c.data,
                data_hash=manifest.content_hash(), base_model=self.base_model, base_id=base_id,
                storage=self.storage, stage1=recipe_for(ov, 1), stage2=recipe_for(ov, 2),
                seed=ov.seed or 0, validation_prompts=list(ov.validation_prompts or []),
                validation=self.validation, resources=self.resources))
        return out


class JobSpec(_Strict):
    """A planned concept job as the ledger stores it (JSON)."""

    concept_id: ConceptId
    batch: str
    trigger: Trigger
    manifest: str
    data_hash: str
    base_model: str
    base_id: str
    storage: str
    stage1: StageRecipe
    stage2: StageRecipe
    seed: int = 0
    validation_prompts: list[str] = []
    validation: ValidationRender = ValidationRender()
    resources: Resources = Resources()

    def recipe(self, stage: int) -> StageRecipe:
        """The recipe of ``stage`` (1 or 2)."""
        if stage not in (1, 2):
            raise ValueError(f"stage: {stage!r} must be 1 or 2")
        return self.stage1 if stage == 1 else self.stage2

    def content_hash(self) -> str:
        """Identity of what gets trained: data, trigger, recipes, seed, prompts and base, by content.

        No path is hashed (the manifest, base model and storage may be mounted elsewhere next time):
        the data by ``data_hash`` (prompts and image bytes), the base by ``base_id`` (its files)."""
        body = self.model_dump(mode="json", exclude={"batch", "resources", "manifest", "base_model", "storage"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def recipe_for(ov: Overrides, stage: int) -> StageRecipe:
    """The recipe of ``stage`` after the overrides (raises ValueError on a bad combination): the seed's,
    then the shared fields, then the stage's own (which win), as ``purecc.recipe.RecipeFields.stage``."""
    per = (ov.stage1 if stage == 1 else ov.stage2).model_dump(exclude_none=True)
    shared = {k: v for k, v in (("resolution", ov.resolution), ("embeddings", ov.embeddings)) if v is not None}
    if stage == 2:
        shared.update({k: getattr(ov, k) for k in ("eta", "lambda_mode", "extractor") if getattr(ov, k) is not None})
    return stage_recipe(stage, **{**shared, **per})


IDENTITY_FULL_BYTES = 1 << 20    # files up to this size are hashed whole (configs, tokenizers)
IDENTITY_SAMPLE_BYTES = 1 << 20  # of larger files (weights), the first and last this many bytes


def model_identity(path: str) -> str:
    """An identity of a base model folder from its content, not its location: every file's relative
    name and size, small files whole, large ones (weights) by their first and last MiB.

    Hashing multi-GB weights whole at every submission would take minutes; their size and ends
    change with any retraining or conversion, and the trainer checks the loaded base's own
    fingerprint against every checkpoint anyway."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}\x00{size}\x00".encode())
        with p.open("rb") as f:
            if size <= IDENTITY_FULL_BYTES:
                h.update(f.read())
            else:
                h.update(f.read(IDENTITY_SAMPLE_BYTES))
                f.seek(size - IDENTITY_SAMPLE_BYTES)
                h.update(f.read(IDENTITY_SAMPLE_BYTES))
    return h.hexdigest()[:16]


# ----- validation ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """One problem of a batch: where (file, concept, dotted field) and what."""

    file: str
    concept: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"concept {self.concept}: " if self.concept else ""
        return f"{self.file}: {where}{self.field}: {self.message}"


class BatchSpecError(ValueError):
    """A rejected batch; ``problems`` lists every (file, concept, field, message)."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"batch rejected ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


def _loc(loc: tuple) -> str:
    return ".".join(str(x) for x in loc) or "(root)"


def _schema_problems(exc: ValidationError, file: str, concept: str | None, prefix: tuple = ()) -> list[Problem]:
    return [Problem(file, concept, _loc(prefix + tuple(e["loc"])), e["msg"]) for e in exc.errors()]


def _concept_label(raw: Any, i: int) -> str:
    cid = raw.get("id") if isinstance(raw, dict) else None
    return f"{cid!r} (#{i + 1})" if isinstance(cid, str) else f"#{i + 1}"


def _resolve(value: str, base_dir: Path) -> str:
    if "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def read_batch_file(path: str | Path) -> dict:
    """Parse a .yaml/.yml/.json file into a dict (never executes anything: safe_load)."""
    path = Path(path)
    if not path.is_file():
        raise BatchSpecError([Problem(str(path), None, "(file)", "batch file does not exist")])
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"unsupported extension {path.suffix!r} (expected .yaml, .yml or .json)")
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise BatchSpecError([Problem(str(path), None, "(file)", f"cannot be parsed: {exc}")]) from None
    if not isinstance(data, dict):
        raise BatchSpecError([Problem(str(path), None, "(root)", "expected a mapping at the top level")])
    return data


@dataclass(frozen=True)
class ValidatedBatch:
    """A valid batch and the concept manifests its validation parsed (concept id -> manifest), so
    that planning its jobs reads no manifest again."""

    spec: BatchSpec
    manifests: Mapping[str, ConceptManifest]

    @classmethod
    def from_file(cls, path: str | Path) -> "ValidatedBatch":
        """Read and validate a batch file; raise one ``BatchSpecError`` listing every problem."""
        path = Path(path)
        return cls.from_dict(read_batch_file(path), source=str(path), base_dir=path.resolve().parent)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "<batch>", base_dir: str | Path = ".") -> "ValidatedBatch":
        """Validate a batch given as a dict (relative paths resolve against ``base_dir``); raise one
        ``BatchSpecError`` listing every problem."""
        base_dir = Path(base_dir)
        problems: list[Problem] = []
        head_raw = {k: v for k, v in data.items() if k != "concepts"}
        try:
            placeholder = [ConceptSpec(id="x", data="x", trigger="x")]  # concepts are checked one by one below
            head = BatchSpec.model_validate({**head_raw, "concepts": placeholder})
        except ValidationError as exc:
            head = None
            problems += _schema_problems(exc, source, None)
        concepts, manifests = _checked_concepts(data.get("concepts"), head, source, base_dir, problems)
        if head is not None:
            problems += _head_problems(head, source, base_dir)
        if problems:
            raise BatchSpecError(problems)
        resolved = {"base_model": _resolve(head.base_model, base_dir), "storage": _resolve(head.storage, base_dir),
                    "ledger": _resolve(head.ledger, base_dir) if head.ledger else None}
        return cls(head.model_copy(update={**resolved, "concepts": concepts}), manifests)

    def jobs(self) -> list[JobSpec]:
        """The batch's jobs (``BatchSpec.jobs``), hashed from the manifests validation parsed."""
        return self.spec.jobs(self.manifests)


def load_batch(path: str | Path) -> BatchSpec:
    """Read and validate a batch file; raise one ``BatchSpecError`` listing every problem."""
    return ValidatedBatch.from_file(path).spec


def validate_batch(data: dict, *, source: str = "<batch>", base_dir: str | Path = ".") -> BatchSpec:
    """Validate a batch given as a dict (relative paths resolve against ``base_dir``)."""
    return ValidatedBatch.from_dict(data, source=source, base_dir=base_dir).spec


def _checked_concepts(raw_concepts: Any, head: BatchSpec | None, source: str, base_dir: Path,
                      problems: list[Problem]) -> tuple[list[ConceptSpec], dict[str, ConceptManifest]]:
    """The valid concepts (data paths resolved) and their parsed manifests; appends every problem."""
    if not isinstance(raw_concepts, list) or not raw_concepts:
        problems.append(Problem(source, None, "concepts", "a non-empty list of concepts is required"))
        raw_concepts = []
    elif len(raw_concepts) > MAX_CONCEPTS:
        problems.append(Problem(source, None, "concepts", f"{len(raw_concepts)} concepts exceed {MAX_CONCEPTS}"))
    concepts, manifests, seen = [], {}, {}
    for i, raw in enumerate(raw_concepts):
        label = _concept_label(raw, i)
        try:
            c = ConceptSpec.model_validate(raw)
        except ValidationError as exc:
            problems += _schema_problems(exc, source, label, ("concepts", i))
            continue
        if c.id in seen:
            problems.append(Problem(source, label, f"concepts.{i}.id",
                                    f"duplicate concept id (also concept #{seen[c.id] + 1})"))
            continue
        seen[c.id] = i
        c = c.model_copy(update={"data": _resolve(c.data, base_dir)})
        found, manifest = _check_concept(c, head, source, label, i)
        problems += found
        if manifest is not None:
            manifests[c.id] = manifest
        concepts.append(c)
    return concepts, manifests


def _head_problems(head: BatchSpec, source: str, base_dir: Path) -> list[Problem]:
    out = []
    try:
        read_model_index(_resolve(head.base_model, base_dir))
    except ModelFolderError as exc:
        out.append(Problem(source, None, "base_model", str(exc)))
    for field, value in (("storage", head.storage), ("ledger", head.ledger)):
        if field == "ledger" and value and value.startswith(("postgresql://", "postgres://")):
            continue
        if value and "://" in value and not value.startswith(URI_SCHEMES):
            out.append(Problem(source, None, field, f"{value!r}: unsupported URI scheme (expected a folder or "
                                                    f"one of {', '.join(URI_SCHEMES)})"))
    if head.ledger and "://" in head.ledger and not head.ledger.startswith(("file://", "postgresql://",
                                                                           "postgres://")):
        out.append(Problem(source, None, "ledger", "a SQLite ledger must be a local path (or use postgresql://...)"))
    if "://" in head.storage and not head.ledger:
        out.append(Problem(source, None, "ledger", "required when storage is a URI (a local SQLite path or a "
                                                   "postgresql:// URL)"))
    return out


def _check_concept(c: ConceptSpec, head: BatchSpec | None, source: str, label: str,
                   i: int) -> tuple[list[Problem], ConceptManifest | None]:
    """The problems of one concept (manifest, recipes) and its parsed manifest (None if unreadable)."""
    out, manifest = [], None
    try:
        manifest = read_concept_manifest(c.data, c.trigger)
    except ManifestError as exc:
        out.append(Problem(source, label, f"concepts.{i}.data", str(exc)))
    ov = c.overrides.merged_over(head.defaults) if head is not None else c.overrides
    for stage in (1, 2):
        try:
            recipe_for(ov, stage)
        except (ValueError, TypeError) as exc:
            out.append(Problem(source, label, f"concepts.{i}.overrides.stage{stage}", str(exc)))
    return out, manifest


def ledger_path_of(path: str | Path) -> str:
    """The ledger a batch file points at, without validating the rest of the batch."""
    data, base = read_batch_file(path), Path(path).resolve().parent
    if isinstance(data.get("ledger"), str):
        return _resolve(data["ledger"], base)
    if isinstance(data.get("storage"), str):
        return f"{_resolve(data['storage'], base)}/ledger.sqlite"
    raise BatchSpecError([Problem(str(path), None, "storage", "neither ledger nor storage is set")])
