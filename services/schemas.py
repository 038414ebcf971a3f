"""The HTTP API's request and response models; they are the OpenAPI schema (served at /openapi.json).

Every field is bounded here, so FastAPI answers a violation with 422 naming the field before any
work is done. Limits that depend on the deployed model or service (largest image side, adapter
slots, images per pass) are checked by the ingress and answered the same way.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.spec import ConceptSpec, Overrides, Prompt, Resources, StageOverrides, ValidationRender
from purecc.ids import CONCEPT_ID_PATTERN

MAX_PROMPT_CHARS = 1000
MAX_CONCEPTS = 8
MIN_WEIGHT, MAX_WEIGHT = -2.0, 2.0
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
SIDE_MULTIPLE, MIN_SIDE, MAX_SIDE = 16, 16, 2048
MAX_IMAGES = 4
MAX_SEED = 2**32 - 1

Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_MULTIPLE)]


class ConceptWeight(BaseModel):
    """A concept to compose and the strength of its adapter."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=CONCEPT_ID_PATTERN, description="Concept id as published in the registry "
                    "(see GET /v1/concepts); write <id> in the prompt where its trigger word goes.")
    weight: float = Field(1.0, ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False,
                          description="Strength of the concept's adapter; 1.0 is the trained strength.")


class GenerateRequest(BaseModel):
    """A prompt to render with some concepts (POST /v1/generate)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "prompt": "a <checkered-star> star next to a <striped-circle> circle",
        "concepts": [{"id": "checkered-star", "weight": 1.0}, {"id": "striped-circle", "weight": 0.8}],
        "seed": 7, "steps": 28, "guidance": 7.0, "num_images": 1}]})

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="Text prompt. <id> placeholders are replaced by the trigger word of the "
                                    "concept with that id, which must be listed in `concepts`.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                                 description="Negative prompt for classifier-free guidance (used as given).")
    concepts: list[ConceptWeight] = Field(default_factory=list, max_length=MAX_CONCEPTS,
                                          description="Concepts to compose, each with its weight; ids must be "
                                                      "distinct. At most the service's slot count.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the first image; image i uses seed + i.")
    steps: int = Field(28, ge=1, le=MAX_STEPS, description="Denoising steps.")
    guidance: float = Field(7.0, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                            description="Classifier-free guidance scale (<= 1 disables guidance).")
    width: Optional[Side] = Field(None, description=f"Image width in pixels, a multiple of {SIDE_MULTIPLE}; "
                                                    "default: the model's native size. Capped by the model.")
    height: Optional[Side] = Field(None, description=f"Image height in pixels, a multiple of {SIDE_MULTIPLE}; "
                                                     "default: the model's native size. Capped by the model.")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="Images to generate with seeds seed, seed+1, ...")

    @field_validator("concepts")
    @classmethod
    def _distinct(cls, value: list[ConceptWeight]) -> list[ConceptWeight]:
        ids = [c.id for c in value]
        dups = sorted({i for i in ids if ids.count(i) > 1})
        if dups:
            raise ValueError(f"duplicate concept ids {dups}")
        return value


class GeneratedImage(BaseModel):
    """One generated image."""

    seed: int = Field(description="The seed this image was drawn with.")
    png_base64: str = Field(description="The PNG file, base64-encoded.")


class ConceptUsed(BaseModel):
    """A concept as it was applied to the request."""

    id: str = Field(description="Concept id.")
    weight: float = Field(description="Weight applied.")
    trigger: str = Field(description="Trigger word substituted for <id> in the prompt.")
    stage: int = Field(description="Training stage of the served adapter (2: PureCC).")
    version: str = Field(description="The served version (see ConceptInfo.version).")
    slot: int = Field(description="Adapter slot it occupied on the replica.")
    hot_loaded: bool = Field(description="Whether this request loaded it into its slot.")


class Timings(BaseModel):
    """Where a request's time went, in milliseconds."""

    queue_ms: float = Field(description="Everything but adapter loading and rendering: routing, waiting for a "
                                        "replica, a free slot or a batch, PNG encoding and transfer.")
    adapter_load_ms: float = Field(description="Time waiting for this request's adapters to reach their slots.")
    denoise_ms: float = Field(description="Duration of the batched pipeline call that rendered the images "
                                          "(text encoding, denoising, VAE decoding).")
    total_ms: float = Field(description="From the ingress receiving the request to the response.")


class GenerateResponse(BaseModel):
    """The images of a request and how they were made."""

    images: list[GeneratedImage] = Field(description="The images, in seed order.")
    concepts: list[ConceptUsed] = Field(description="The concepts used, in request order.")
    prompt: str = Field(description="The prompt as rendered, with trigger words substituted.")
    seed: int = Field(description="Seed of the first image.")
    steps: int = Field(description="Denoising steps.")
    guidance: float = Field(description="Guidance scale.")
    width: int = Field(description="Image width in pixels.")
    height: int = Field(description="Image height in pixels.")
    batch_images: int = Field(description="Images in the denoising pass that rendered this request "
                                          "(more than num_images when batched with other requests).")
    replica: str = Field(description="The generator replica that served the request.")
    timings: Timings = Field(description="Where the time went, in milliseconds.")


class ConceptInfo(BaseModel):
    """A servable concept (GET /v1/concepts)."""

    id: str = Field(description="Concept id, for `concepts[].id` and <id> placeholders.")
    trigger: str = Field(description="Trigger word.")
    stage: int = Field(description="Training stage of the published adapter.")
    steps: int = Field(description="Training steps of the published adapter.")
    rank: int = Field(description="LoRA rank.")
    version: str = Field(description=(
        "The served version: the sha256 of the LoRA weights, or for a concept with embeddings the sha256 "
        "of its weights, embeddings and trigger together; it changes exactly when what is served changes."))
    created: float = Field(description="When the adapter was exported (Unix time).")


class ConceptList(BaseModel):
    """The servable concepts."""

    concepts: list[ConceptInfo] = Field(description="Servable concepts: published and made for this base.")


class Health(BaseModel):
    """Whether the service is ready (GET /healthz)."""

    status: str = Field(description="ok, or loading while no generator replica has its model ready.")
    detail: str = Field("", description="Why the service is not ready, if it is not.")
    slots: int = Field(0, description="Adapter slots per replica.")
    max_side: int = Field(0, description="Largest image side this model accepts, in pixels.")


class ErrorBody(BaseModel):
    """An error answer."""

    detail: str = Field(description="What went wrong.")
    concept: Optional[str] = Field(None, description="The concept id at fault, when one is.")


# ----- concept batches (POST /v1/batches) ------------------------------------------------------
# cluster.spec owns the batch schema. These models subclass its models and re-declare only the
# fields whose bounds are tighter over HTTP (the rest, descriptions included, are inherited);
# cluster.spec validates the result again. BatchRequest is BatchSpec without what the service fixes
# (base_model: its own model; storage and ledger: its storage root), plus the submission flags.
MAX_BATCH_CONCEPTS = 32
MAX_BATCH_BYTES = 1024 * 1024
MAX_PATH_CHARS = 1024
MAX_TRAIN_STEPS = 100_000
MAX_VALIDATION_PROMPTS = 8


class BatchStage(StageOverrides):
    """One training stage's knobs; unset fields keep the seed recipe."""

    steps: Optional[int] = Field(None, ge=1, le=MAX_TRAIN_STEPS, description="Optimiser steps of this stage; "
                                 "default: the seed recipe's.")
    grad_accum: Optional[int] = Field(None, ge=1, le=64, description="Micro-batches per optimiser step.")
    checkpoint_every: Optional[int] = Field(None, ge=1, le=MAX_TRAIN_STEPS,
                                            description="Steps between checkpoints (a run resumes from the last).")
    batch_size: Optional[int] = Field(None, ge=1, le=64, description="Samples per concept per micro-step.")
    resolution: Optional[int] = Field(None, ge=16, le=2048, multiple_of=16, description="This stage's training "
                                      "resolution in pixels (over the batch's `resolution`).")
    eta: Optional[float] = Field(None, ge=0, le=100, description="Stage 2: weight of L_pure.")
    rank: Optional[int] = Field(None, ge=1, le=128, description="LoRA rank; stage 2's must equal the service's "
                                "adapter slots' rank (`rank` of the service config), or the concept is refused.")


class BatchOverrides(Overrides):
    """Recipe overrides of one concept, or of every concept of the batch (`defaults`)."""

    resolution: Optional[int] = Field(None, ge=16, le=2048, multiple_of=16, description="Training resolution "
                                      "in pixels (SD3.5 Medium: 512 to 1024).")
    eta: Optional[float] = Field(None, ge=0, le=100, description="Stage 2: weight of L_pure.")
    validation_prompts: Optional[list[Prompt]] = Field(
        None, max_length=MAX_VALIDATION_PROMPTS, description="Rendered at the end of each stage; [v] becomes "
                                                             "the trigger word.")
    stage1: BatchStage = Field(default_factory=BatchStage, description="Stage 1 (DreamBooth LoRA) knobs.")
    stage2: BatchStage = Field(default_factory=BatchStage, description="Stage 2 (PureCC LoRA) knobs.")


class BatchResources(Resources):
    """How the batch's training runs are placed on the cluster."""

    cpus_per_worker: float = Field(1.0, gt=0, le=64, description="CPUs per training worker.")
    concepts_per_pack: Optional[int] = Field(None, ge=1, le=16, description="Concepts trained together on one "
                                             "worker; unset: sized from the GPU memory model.")
    max_concurrent: int = Field(2, ge=1, le=64, description="Training runs at the same time.")
    max_failures: int = Field(1, ge=1, le=10, description="Worker restarts per run, each resuming from the "
                                                          "last checkpoint.")
    max_attempts: int = Field(2, ge=1, le=10, description="Failed runs per job stage before the job fails.")


class BatchValidation(ValidationRender):
    """How the validation images are rendered."""

    steps: int = Field(20, ge=1, le=MAX_STEPS, description="Denoising steps of the validation images.")
    guidance: float = Field(4.0, ge=0, le=MAX_GUIDANCE, description="Guidance scale of the validation images.")


class BatchConcept(ConceptSpec):
    """One concept to train, its data under the service's <storage>/data/."""

    data: str = Field(min_length=1, max_length=MAX_PATH_CHARS, description="The concept's manifest (CSV or "
                      "Parquet), relative to <storage>/data/ on the service; it and its images must stay inside "
                      "that folder (no absolute paths, no escaping '..' or symlinks).")
    overrides: BatchOverrides = Field(default_factory=BatchOverrides,
                                      description="This concept's recipe overrides, on top of `defaults`.")


# BatchSpec's fields less FIXED (services.batches): pydantic cannot drop inherited fields, so this
# model does not subclass BatchSpec; it declares the others with their HTTP models.
class BatchRequest(BaseModel):
    """A concept batch to train; the service sets the base model, the storage root and the ledger."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "name": "shapes-v1",
        "resources": {"gpus_per_worker": 1, "concepts_per_pack": 4, "max_concurrent": 2},
        "defaults": {"resolution": 512, "stage1": {"steps": 1000}, "stage2": {"steps": 800}},
        "concepts": [{"id": "checkered-star", "data": "checkered-star/manifest.csv", "trigger": "zqx"}]}]})

    name: str = Field(pattern=CONCEPT_ID_PATTERN, description="Batch name (same rule as concept ids); its status "
                                                              "is at GET /v1/batches/{name}.")
    concepts: list[BatchConcept] = Field(min_length=1, max_length=MAX_BATCH_CONCEPTS,
                                         description="The concepts to train; ids must be distinct.")
    resources: BatchResources = Field(default_factory=BatchResources,
                                      description="How the training runs are placed on the cluster.")
    defaults: BatchOverrides = Field(default_factory=BatchOverrides,
                                     description="Recipe overrides for every concept of the batch.")
    validation: BatchValidation = Field(default_factory=BatchValidation,
                                        description="How validation images are rendered.")
    replace: bool = Field(False, description="Retrain concepts already in the ledger with other content (data, "
                                             "trigger, recipe); without it such a concept is answered 409.")
    requeue: bool = Field(False, description="Put identical failed or cancelled concepts back in line (they "
                                             "resume from their checkpoints).")


class JobStatus(BaseModel):
    """One job of a batch: its state, progress, error and adapter."""

    id: str = Field(description="Concept id.")
    state: str = Field(description="queued, stage1 or stage2 (training that stage), published, failed or "
                                   "cancelled.")
    stage: Optional[int] = Field(None, description="Stage of the latest progress report (1 or 2).")
    step: Optional[int] = Field(None, description="Steps done in that stage.")
    total: Optional[int] = Field(None, description="Steps of that stage.")
    loss: Optional[float] = Field(None, description="Latest training loss.")
    eta_s: Optional[float] = Field(None, description="Estimated seconds left in the current stage.")
    attempts: int = Field(description="Training runs launched for this job so far.")
    cancel_requested: bool = Field(description="Whether a cancellation is pending or was done.")
    error: Optional[str] = Field(None, description="Why the job failed, or the failure its retry follows.")
    adapter: Optional[str] = Field(None, description="The published adapter's folder relative to the service's "
                                                     "storage root (state published); the concept is then "
                                                     "servable by its id.")
    submitted_at: float = Field(description="When the job was first recorded (Unix time).")
    updated_at: float = Field(description="Its last state change (Unix time).")
    stage1_started: Optional[float] = Field(None, description="Stage 1's first step (Unix time).")
    stage1_ended: Optional[float] = Field(None, description="Stage 1's end (Unix time).")
    stage2_started: Optional[float] = Field(None, description="Stage 2's first step (Unix time).")
    stage2_ended: Optional[float] = Field(None, description="Stage 2's end (Unix time).")
    published_at: Optional[float] = Field(None, description="When the adapter was published (Unix time).")


class BatchStatus(BaseModel):
    """A batch's jobs (GET /v1/batches/{name})."""

    batch: str = Field(description="Batch name.")
    done: bool = Field(description="True once no job of the batch is queued or training.")
    counts: dict[str, int] = Field(description="Jobs per state.")
    jobs: list[JobStatus] = Field(description="The batch's jobs, in submission order.")


class BatchSubmitted(BatchStatus):
    """A submitted batch's status and what the submission recorded (POST /v1/batches)."""

    added: list[str] = Field(description="Concepts recorded by this request.")
    unchanged: list[str] = Field(description="Concepts already recorded with the same content (kept as they are).")
    replaced: list[str] = Field(description="Concepts recorded with other content before, now retrained.")
    requeued: list[str] = Field(description="Failed or cancelled concepts put back in line.")
    driver: Literal["started", "running", "idle"] = Field(
        description="started: this request started the training driver; running: a live driver holds the "
                    "ledger and picks the jobs up; idle: nothing is left to train.")


class BatchCancelled(BatchStatus):
    """A batch after its cancellation (POST /v1/batches/{name}/cancel)."""

    messages: list[str] = Field(description="What happened to each job: cancelled, cancellation requested (it "
                                            "stops at its next step), or already finished.")


class BatchSummary(BaseModel):
    """One batch of the ledger, in short."""

    batch: str = Field(description="Batch name.")
    done: bool = Field(description="True once no job of the batch is queued or training.")
    counts: dict[str, int] = Field(description="Jobs per state.")
    submitted_at: float = Field(description="Its first job's submission (Unix time).")
    updated_at: float = Field(description="Its latest job change (Unix time).")


class BatchList(BaseModel):
    """The batches in the ledger (GET /v1/batches)."""

    batches: list[BatchSummary] = Field(description="Batches in the ledger, oldest first.")


class StageCurve(BaseModel):
    """One stage's training loss, downsampled: each point is the mean loss of a run of steps."""

    points: list[tuple[int, int, float]] = Field(description="[first step, last step, mean loss] per bucket, in "
                                                             "step order (at most a few hundred).")
    bucket: int = Field(description="Steps per bucket (the last one may hold fewer).")
    steps: int = Field(description="Steps recorded so far.")


class JobLoss(BaseModel):
    """A batch job's loss curves (GET /v1/batches/{name}/concepts/{concept_id}/loss)."""

    id: str = Field(description="Concept id.")
    state: str = Field(description="The job's state (as in the batch status).")
    stages: dict[str, StageCurve] = Field(description="Stage ('1', '2') -> its curve; a stage that reported "
                                                      "none yet is absent. Updated while training (every "
                                                      "~10 s and at a stage's end).")


class ValidationImage(BaseModel):
    """One validation image of a published concept (rendered at the end of a training stage)."""

    stage: int = Field(description="The stage whose end rendered it (1 or 2).")
    name: str = Field(description="File name (NN.png).")
    prompt: Optional[str] = Field(None, description="The prompt it was rendered from (trigger filled in), when "
                                                    "recorded.")
    url: str = Field(description="Where to GET the PNG (relative to the service root).")


class ValidationList(BaseModel):
    """A concept's validation images (GET /v1/concepts/{concept_id}/validation)."""

    id: str = Field(description="Concept id.")
    images: list[ValidationImage] = Field(description="Stage 1's, then stage 2's, each in name order; empty when "
                                                      "the concept was trained without validation prompts.")
