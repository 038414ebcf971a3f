"""Service configuration: what ``purecc serve`` flags and the ``serve deploy`` file's ``args`` set.

Every knob has a default and a sentence of advice. The HTTP request bounds live in
``services.schemas``; this is the deployment side.
"""

from __future__ import annotations

import os
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .auth import TOKENS_FILE, AuthSettings
from .limits import LimitSettings


class ServiceConfig(BaseModel):
    """The deployment's knobs, validated; ``registry`` defaults to ``storage``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Local diffusers SD3/SD3.5 folder, present on every replica's node "
                                   "(nothing is downloaded).")
    registry: Optional[str] = Field(None, description="Adapter registry root written by cluster/: a folder or a "
                                                      "pyarrow.fs URI such as s3://bucket/prefix. Default: "
                                                      "`storage` (required when `storage` is unset).")
    storage: Optional[str] = Field(None, description="Training storage root (a local or NFS folder on the ingress's "
                                                     "node): enables POST /v1/batches. Concept data is read from "
                                                     "<storage>/data/ only, jobs are recorded in "
                                                     "`ledger` and adapters published to the "
                                                     "registry, which must then be this same folder.")
    ledger: Optional[str] = Field(None, description="The training job ledger: default <storage>/ledger.sqlite "
                                                    "(one machine); postgresql://user@host/db when drivers or "
                                                    "ingresses run on several nodes.")
    slots: int = Field(8, ge=1, le=256, description="Adapter slots per replica: concepts resident on the device "
                                                    "at once. 9 MiB each on SD3.5-M; also the most concepts "
                                                    "one request can compose.")
    rank: int = Field(4, ge=1, le=128, description="LoRA rank of the slots; every served adapter must match it.")
    host_cache: int = Field(64, ge=1, description="Concepts kept in host memory per replica (pinned on CUDA), "
                                                  "so a re-load into a slot skips the registry.")
    dtype: str = Field("auto", description="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    load_t5: bool = Field(True, description="Load T5 when the model folder has it; false saves ~9 GiB.")
    replicas: int = Field(1, ge=1, description="Generator replicas; each loads the base once.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per generator replica (1 on a GPU cluster).")
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs reserved per generator replica.")
    max_replicas_per_node: Optional[int] = Field(None, ge=1, description="At most this many generator replicas "
                                                 "on one node (Serve's max_replicas_per_node): 1 spreads them, so "
                                                 "a lost node takes one replica and its concepts, not all.")
    ingress_on_head: bool = Field(False, description="Pin the HTTP ingress (0 CPUs) to the head node, where "
                                                     "Serve's controller and proxy run, so losing a worker node "
                                                     "never takes it (its requests go on on other replicas).")
    max_batch_images: int = Field(8, ge=1, le=64, description="Most images in one denoising pass; requests "
                                                              "that share size, steps and guidance are batched.")
    batch_wait_s: float = Field(0.02, ge=0, le=5, description="How long a pass waits for more requests to "
                                                              "join before it starts.")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests a generator replica accepts at once "
                                                            "(loading, queued for a pass, or rendering); keep "
                                                            ">= max_batch_images so a pass can fill.")
    max_queued_requests: int = Field(64, ge=1, description="Requests waiting for a replica beyond that; more "
                                                           "are answered 503 at once.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request still unanswered after this is "
                                                              "cancelled and answered 503.")
    slot_wait_s: float = Field(30.0, ge=0, description="How long a request waits for a slot when every slot is "
                                                       "held by in-flight requests, before 503.")
    catalog_ttl_s: float = Field(2.0, ge=0, description="How long the ingress trusts a concept's manifest "
                                                        "before re-reading it (unknown ids are always re-read).")
    routing_stats_period_s: float = Field(2.0, gt=0, description="How often replicas report their resident "
                                                                 "concepts to the request router.")
    warmup: bool = Field(True, description="Run one tiny pass before taking traffic (first-pass costs on GPU).")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Body deadline and size limits, "
                                                                             "and the render cost bound.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="Bearer tokens, rate limits and "
                                                                         "per-owner quotas (services.auth).")

    @model_validator(mode="before")
    @classmethod
    def _registry_defaults_to_storage(cls, data):
        if isinstance(data, dict) and data.get("registry") is None and data.get("storage"):
            data = {**data, "registry": data["storage"]}
        return data

    @model_validator(mode="after")
    def _check(self) -> "ServiceConfig":
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if not self.registry:
            raise ValueError("registry: required (or set storage, whose adapters/ folder is then the registry)")
        if self.ledger is not None and not self.ledger.startswith(("postgresql://", "postgres://")):
            raise ValueError("ledger: must be a postgresql:// URL (leave it unset for <storage>/ledger.sqlite)")
        if self.ledger is not None and self.storage is None:
            raise ValueError("ledger: needs storage (the batches it records train into storage)")
        if self.storage is not None:
            if "://" in self.storage:
                raise ValueError(f"storage: {self.storage!r} must be a local folder (its ledger is SQLite)")
            if "://" in self.registry or os.path.realpath(self.registry) != os.path.realpath(self.storage):
                raise ValueError(f"registry: {self.registry!r} must be the storage root {self.storage!r} when "
                                 "storage is set (batches publish into <storage>/adapters/, which this service "
                                 "must serve)")
        return self

    @property
    def tokens_file(self) -> str | None:
        """The token file: ``auth.tokens``, else ``<storage>/auth/tokens.json``, else None (no token is valid)."""
        if self.auth.tokens:
            return self.auth.tokens
        return os.path.join(self.storage, TOKENS_FILE) if self.storage else None

    @property
    def max_images_per_request(self) -> int:
        """Most images one request may ask for: ``MAX_IMAGES`` capped at ``max_batch_images``."""
        from .schemas import MAX_IMAGES

        return min(MAX_IMAGES, self.max_batch_images)
