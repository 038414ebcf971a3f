"""The HTTP API's request and response models; they are the OpenAPI schema (served at /openapi.json).

Every field is bounded here, so FastAPI answers a violation with 422 naming the field before any
work is done. Limits that depend on the deployed model or service (largest image side, adapter
slots, images per pass) are checked by the ingress and answered the same way.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=CONCEPT_ID_PATTERN, description="Concept id as published in the registry "
                    "(see GET /v1/concepts); write <id> in the prompt where its trigger word goes.")
    weight: float = Field(1.0, ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False,
                          description="Strength of the concept's adapter; 1.0 is the trained strength.")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "prompt": "a <zigzag-star> star next to a <ringed-circle> circle",
        "concepts": [{"id": "zigzag-star", "weight": 1.0}, {"id": "ringed-circle", "weight": 0.8}],
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
    seed: int = Field(description="The seed this image was drawn with.")
    png_base64: str = Field(description="The PNG file, base64-encoded.")


class ConceptUsed(BaseModel):
    id: str = Field(description="Concept id.")
    weight: float = Field(description="Weight applied.")
    trigger: str = Field(description="Trigger word substituted for <id> in the prompt.")
    stage: int = Field(description="Training stage of the served adapter (2: PureCC).")
    version: str = Field(description="sha256 of the adapter weights served (identifies a publication).")
    slot: int = Field(description="Adapter slot it occupied on the replica.")
    hot_loaded: bool = Field(description="Whether this request loaded it into its slot.")


class Timings(BaseModel):
    queue_ms: float = Field(description="Everything but adapter loading and rendering: routing, waiting for a "
                                        "replica, a free slot or a batch, PNG encoding and transfer.")
    adapter_load_ms: float = Field(description="Time waiting for this request's adapters to reach their slots.")
    denoise_ms: float = Field(description="Duration of the batched pipeline call that rendered the images "
                                          "(text encoding, denoising, VAE decoding).")
    total_ms: float = Field(description="From the ingress receiving the request to the response.")


class GenerateResponse(BaseModel):
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
    id: str = Field(description="Concept id, for `concepts[].id` and <id> placeholders.")
    trigger: str = Field(description="Trigger word.")
    stage: int = Field(description="Training stage of the published adapter.")
    steps: int = Field(description="Training steps of the published adapter.")
    rank: int = Field(description="LoRA rank.")
    version: str = Field(description="sha256 of the adapter weights.")
    created: float = Field(description="When the adapter was exported (Unix time).")


class ConceptList(BaseModel):
    concepts: list[ConceptInfo] = Field(description="Servable concepts: published and made for this base.")


class Health(BaseModel):
    status: str = Field(description="ok, or loading while no generator replica has its model ready.")
    detail: str = Field("", description="Why the service is not ready, if it is not.")
    slots: int = Field(0, description="Adapter slots per replica.")
    max_side: int = Field(0, description="Largest image side this model accepts, in pixels.")


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong.")
    concept: Optional[str] = Field(None, description="The concept id at fault, when one is.")
