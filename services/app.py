"""The HTTP API (FastAPI ingress) and the Serve application that puts it in front of the generator.

    POST /v1/generate       prompt + concepts [{id, weight}] -> PNGs (base64) with metadata
    GET  /v1/concepts       servable concepts
    GET  /v1/concepts/{id}/validation   its validation images (GET .../validation/{stage}/{NN}.png: one PNG)
    POST /v1/batches        a concept batch to train (202, Location: /v1/batches/{name})
    GET  /v1/batches/{name} its jobs: state, step/total, loss, ETA, error, adapter, timestamps
    GET  /v1/batches        the caller's batches
    GET  /v1/batches/{name}/concepts/{id}/loss   a job's loss curve per stage (downsampled)
    POST /v1/batches/{name}/cancel   cancel a batch's unfinished jobs
    POST /v1/datasets       upload images (or one zip) as a dataset a batch can train on (201)
    GET  /v1/datasets       the caller's datasets; GET/DELETE /v1/datasets/{id} one of them
    GET  /                  the web page (services/page/: concepts, batches with loss curves, composer)
    GET  /healthz           200 once a generator replica has its model loaded, 503 before
    GET  /openapi.json      the schema (interactive docs at /docs)

Every route but /healthz and the docs needs a bearer token (``services.auth``): generate scope for
/v1/generate and /v1/concepts, submit scope for the batch routes, admin for every owner's batches.
401 (``WWW-Authenticate: Bearer``): no valid token; 403: the token lacks the scope, or the batch or
concept belongs to another owner; 429 (``Retry-After``): the token's rate or its owner's quota.
A caller sees and composes its own concepts and those without an owner (published by the operator's
tools); another owner's trained concept answers 404 as if it did not exist.

Status codes: 422 names the offending field (FastAPI's own shape, also for the limits checked
here; a rejected batch lists every problem); 404 names an unknown concept or batch; 503 (with
Retry-After) means overloaded (the generator's bounded queue is full, or every adapter slot is held
by in-flight requests) or timed out. Bad input never produces a 500.

The batch routes need ``storage`` in the service config (``services.batches``); without it they
answer 404 "batch submission is not enabled on this service". A published concept is servable by
the next request, without a restart (unknown ids are always looked up in the registry).

Two deployments: this ingress (cheap, validates, resolves trigger words, answers 404/422 without
touching a GPU) and ``ConceptGenerator`` behind a handle, routed by ``services.routing``. A generator
call whose replica died (its node lost) is sent again to another replica, so a lost node costs its
in-flight requests time, not an error.
"""

# no `from __future__ import annotations`: FastAPI must see the route signatures' real types
# through serve.ingress's wrappers
import asyncio
import base64
import json
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

from fastapi import Depends, FastAPI, File, Form, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from cluster.ledger import ContentConflict, LedgerError, NotOwner, Quota, QuotaExceeded
from cluster.ledger_sql import DATABASE_ERRORS
from purecc.adapter_files import AdapterFileError, FileMissing, UnsafeFile
from purecc.generate import RenderSettings, fill_placeholders, trained_sequence_length
from purecc.ids import CONCEPT_ID_PATTERN
from purecc.registry import AdapterRegistry

from .adapter_cache import adapter_version
from .auth import Authority, Principal, require
from .batches import BaseModelUnreadable, BatchRejected, StorageBatches, UnknownBatch
from .catalog import ConceptCatalog
from .datasets import (DATASET_ID, DatasetDeleted, DatasetInfo, DatasetList, DatasetRejected, StorageDatasets,
                       TooManyDatasets, UnknownDataset, Upload)
from .config import ServiceConfig
from .deployment import ConceptGenerator, ConceptUse, RenderResult, RenderTask, keep_replica_grpc_on_loopback
from .errors import ConceptUnloadable, SlotsBusy, TooManyConcepts, UnknownConcept
from .limits import check_render_cost, install as install_limits
from .schemas import (MAX_BATCH_BYTES, BatchCancelled, BatchList, BatchRequest, BatchStatus, BatchSubmitted,
                      ConceptInfo, ConceptList, ConceptUsed, ErrorBody, GeneratedImage, GenerateRequest,
                      GenerateResponse, Health, JobLoss, Timings, ValidationImage, ValidationList)

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 2.0
REPLICA_RETRIES = 2          # a call whose generator replica died is sent again, to another replica
REPLICA_RETRY_WAIT_S = 0.2
REPLICA_LOST = (ActorDiedError, ActorUnavailableError)
HEAD_RESOURCE = "node:__internal_head__"     # Ray's resource of the head node (ingress_on_head)
INGRESS_HEADROOM = 32      # requests the ingress holds beyond the generators' capacity (404/422s, health)
ROUTER = "services.routing:ConceptAffinityRouter"
PAGE = Path(__file__).with_name("page")        # plain files, no build step; the page talks to /v1/* itself
PAGE_ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'"}

api = FastAPI(title="purecc", version="0.1.0",
              description="Multi-concept generation on one shared SD3/SD3.5 base with hot-loaded PureCC adapters.")
install_limits(api)     # body deadline and size on every route (settings: api.state.limits)
AUTH_ERRORS = {
    401: {"model": ErrorBody, "description": "No valid bearer token (missing, unknown, revoked or malformed)."},
    403: {"model": ErrorBody, "description": "The token lacks this route's scope, or the batch or concept "
                                             "belongs to another owner."},
    429: {"model": ErrorBody, "description": "The token's rate limit or its owner's quota; retry after "
                                             "Retry-After seconds."}}
ERRORS = {400: {"model": ErrorBody, "description": "The body cannot be parsed (FastAPI's answer to bytes that "
                                             "are not UTF-8)."},
          404: {"model": ErrorBody, "description": "A requested concept is not servable."},
          503: {"model": ErrorBody, "description": "Overloaded or timed out; retry after Retry-After seconds."},
          **AUTH_ERRORS}
NO_BATCHES = "batch submission is not enabled on this service (it was started without a storage root)"
BATCH_ERRORS = {
    404: {"model": ErrorBody, "description": "Unknown batch, or " + NO_BATCHES + "."},
    409: {"model": ErrorBody, "description": "A concept is in the ledger with other content (resubmit with "
                                             "replace), or is training and cannot be replaced now."},
    413: {"model": ErrorBody, "description": f"The body exceeds {MAX_BATCH_BYTES} bytes."},
    503: {"model": ErrorBody, "description": "The ledger or the service's model cannot be read now, or the "
                                             "training driver could not be started (the jobs are recorded)."},
    **AUTH_ERRORS}
INVALID = {422: {"description": "The batch is rejected: every problem, in FastAPI's shape (detail: [{loc, msg, "
                                "type}]).",
                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}}
NO_DATASETS = "dataset uploads are not enabled on this service (it was started without a storage root)"
DATASET_ERRORS = {
    400: ERRORS[400],
    404: {"model": ErrorBody, "description": "Unknown dataset (or another owner's), or " + NO_DATASETS + "."},
    409: {"model": ErrorBody, "description": "The owner holds the most datasets allowed; delete one first."},
    413: {"model": ErrorBody, "description": "The body (LimitSettings.max_upload_bytes), an image, a zip entry or "
                                             "the unpacked zip is larger than allowed."},
    503: {"model": ErrorBody, "description": "The storage cannot be written now; retry after Retry-After seconds."},
    **AUTH_ERRORS}
DATASET_READ_ERRORS = {k: DATASET_ERRORS[k] for k in (404, 503, 401, 403, 429)}


def _authority() -> Authority:
    """The serving replica's ``Authority`` (the dependency runs inside the ingress replica)."""
    return serve.get_replica_context().servable_object.authority


Generator = Annotated[Principal, Depends(require("generate", _authority))]
Submitter = Annotated[Principal, Depends(require("submit", _authority))]
BatchName = Annotated[str, PathParam(pattern=CONCEPT_ID_PATTERN, description="Batch name, as submitted.")]
ConceptPath = Annotated[str, PathParam(pattern=CONCEPT_ID_PATTERN, description="Concept id.")]
DatasetId = Annotated[str, PathParam(pattern=DATASET_ID.pattern, description="Dataset id, as uploaded.")]


class ApiError(Exception):
    """An error with its HTTP answer. ``loc``: the request field at fault (answered in FastAPI's 422 shape)."""

    def __init__(self, status: int, detail: str, *, loc: tuple = (), concept: str | None = None,
                 retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.detail, self.loc = status, detail, loc
        self.concept, self.retry_after = concept, retry_after


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    if exc.loc:
        body = {"detail": [{"loc": ["body", *exc.loc], "msg": exc.detail, "type": "value_error"}]}
    else:
        body = ErrorBody(detail=exc.detail, concept=exc.concept).model_dump()
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


@api.exception_handler(UnknownConcept)
async def _unknown_concept(request: Request, exc: UnknownConcept) -> JSONResponse:
    """An unknown or unservable concept found outside the generator call (the catalog): 404, its reason."""
    return JSONResponse(ErrorBody(detail=str(exc), concept=exc.concept_id).model_dump(), status_code=404)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 shape without the offending input, which may not even be JSON (NaN) or be huge."""
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


def _openapi() -> dict:
    """FastAPI's schema plus the batch request body, which the route reads itself (to list the
    schema's problems together with the data's in one 422)."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        body = BatchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(body.pop("$defs", {}))
        schemas["BatchRequest"] = body
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}}}}}


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


async def _json_body(request: Request, limit: int) -> Any:
    """The JSON body, counted on the bytes received (413 past ``limit``); 422 if it is not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body ({declared} bytes) exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise RequestValidationError([{"loc": ("body",), "msg": f"invalid JSON: {exc}",
                                       "type": "json_invalid"}]) from None


def _cause(exc: BaseException) -> BaseException:
    """The generator's own exception inside Ray's wrapper (RayTaskError.cause)."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def _as_api_error(exc: BaseException, concept_index: dict[str, int]) -> ApiError | None:
    cause = _cause(exc)
    if isinstance(cause, UnknownConcept):
        return ApiError(404, str(cause), concept=cause.concept_id)
    if isinstance(cause, ConceptUnloadable):
        return ApiError(422, str(cause), loc=("concepts", concept_index.get(cause.concept_id, 0), "id"),
                        concept=cause.concept_id)
    if isinstance(cause, TooManyConcepts):
        return ApiError(422, str(cause), loc=("concepts",))
    if isinstance(cause, SlotsBusy):
        return ApiError(503, str(cause), retry_after=1)
    if isinstance(cause, BackPressureError):
        return ApiError(503, "the service is at capacity (generator queue full); retry later", retry_after=1)
    if isinstance(cause, RayServeException):
        return ApiError(503, f"the generator is unavailable: {cause}", retry_after=5)
    return None


@serve.deployment(name="GenerationAPI", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class GenerationAPI:
    """The HTTP ingress: validates requests, resolves concepts, and calls the generator replicas."""

    def __init__(self, generator: DeploymentHandle, config: ServiceConfig):
        keep_replica_grpc_on_loopback()
        self.generator, self.config = generator, config
        api.state.limits = config.limits
        self.catalog = ConceptCatalog(AdapterRegistry(config.registry), config.catalog_ttl_s)
        self.authority = Authority(config.auth, config.tokens_file)
        quota = Quota(active_concepts=config.auth.max_queued_concepts, active_batches=config.auth.max_training_batches)
        self.batches = (StorageBatches(config.storage, config.model, quota, ledger=config.ledger, slot_rank=config.rank)
                        if config.storage else None)
        self.datasets = StorageDatasets(config.storage) if config.storage else None
        if self.batches is not None:     # unfinished jobs of an earlier run go on without a new submission
            threading.Thread(target=self._resume_batches, name="purecc-resume", daemon=True).start()
        self._model: dict | None = None

    def _resume_batches(self) -> None:
        try:
            if self.batches.resume():
                log.info("started a driver for the unfinished jobs of the ledger")
        except Exception:                # the ledger unreadable now: the next submission tries again
            log.exception("could not resume the unfinished jobs of the ledger")

    async def _call(self, method: str, *args, timeout: float, concept_index: dict[str, int] | None = None):
        """``generator.<method>(*args)`` with a deadline, its errors mapped to HTTP answers.

        A replica that died under the call (its node lost, its process killed) is retried on another
        one, up to ``REPLICA_RETRIES`` times within the deadline: every generator call is idempotent
        (a render is fixed by its seeds), and Serve's router has by then dropped the dead replica."""
        deadline = time.monotonic() + max(timeout, 0.001)
        for attempt in range(REPLICA_RETRIES + 1):
            response = None

            async def result():
                return await response
            try:
                # inside the try: a full handle queue may raise BackPressureError from .remote() itself
                response = getattr(self.generator, method).remote(*args)
                return await asyncio.wait_for(result(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(503, f"no answer within {max(1, round(timeout))}s; the service is overloaded, "
                                    "still loading, or the request is too large", retry_after=5) from None
            except Exception as exc:
                if isinstance(exc, REPLICA_LOST) or isinstance(_cause(exc), REPLICA_LOST):
                    if attempt == REPLICA_RETRIES or time.monotonic() >= deadline:
                        raise ApiError(503, "the generator replica serving this request was lost; retry",
                                       retry_after=1) from None
                    log.warning("generator replica lost during %s (%s); retrying on another (%d/%d)", method,
                                type(exc).__name__, attempt + 1, REPLICA_RETRIES)
                    await asyncio.sleep(REPLICA_RETRY_WAIT_S)
                    continue
                mapped = _as_api_error(exc, concept_index or {})
                if mapped is None:
                    raise
                raise mapped from None

    async def _model_info(self, timeout: float) -> dict:
        if self._model is None:
            self._model = await self._call("describe", timeout=timeout)
        return self._model

    @api.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS,
              summary="Generate images with concepts composed on the shared base")
    async def generate(self, body: GenerateRequest, principal: Generator) -> GenerateResponse:
        """Render a request's images with its concepts composed on the shared base."""
        start = time.perf_counter()
        deadline = start + self.config.request_timeout_s
        info = await self._model_info(deadline - time.perf_counter())
        width, height = body.width or info["native_side"], body.height or info["native_side"]
        self._check_limits(body, info, width, height)
        hidden = await self._others_concepts([c.id for c in body.concepts], principal)
        manifests = {}
        for c in body.concepts:
            m = None if c.id in hidden else await self.catalog.lookup(c.id)
            if m is None:
                raise ApiError(404, f"concept {c.id!r} is not in the adapter registry", concept=c.id)
            if m.base_fingerprint != info["base_fingerprint"]:
                raise ApiError(404, f"concept {c.id!r} was trained on another base model", concept=c.id)
            manifests[c.id] = m
        try:
            prompt = fill_placeholders(body.prompt, {cid: m.trigger for cid, m in manifests.items()})
        except KeyError as exc:
            raise ApiError(422, f"placeholder <{exc.args[0]}> names no concept of this request",
                           loc=("prompt",)) from None
        try:      # prompts are encoded with as many T5 tokens as the concepts were trained with
            text_len = trained_sequence_length(manifests.values())
        except ValueError as exc:
            raise ApiError(422, str(exc), loc=("concepts",)) from None
        task = RenderTask(prompt=prompt, seeds=tuple(body.seed + i for i in range(body.num_images)),
                          settings=RenderSettings(steps=body.steps, guidance=body.guidance, width=width,
                                                  height=height, max_sequence_length=text_len),
                          concepts=tuple(ConceptUse(c.id, c.weight, adapter_version(manifests[c.id]))
                                         for c in body.concepts),
                          negative_prompt=body.negative_prompt)
        index = {c.id: i for i, c in enumerate(body.concepts)}
        result: RenderResult = await self._call("render", task, timeout=deadline - time.perf_counter(),
                                                concept_index=index)
        return self._response(body, task, result, manifests, time.perf_counter() - start)

    def _check_limits(self, body: GenerateRequest, info: dict, width: int, height: int) -> None:
        for name, side in (("width", width), ("height", height)):
            if side > info["max_side"]:
                raise ApiError(422, f"{side} exceeds this model's largest side, {info['max_side']}", loc=(name,))
        if body.num_images > info["max_images"]:
            raise ApiError(422, f"{body.num_images} images requested, at most {info['max_images']} per request",
                           loc=("num_images",))
        if len(body.concepts) > info["slots"]:
            raise ApiError(422, str(TooManyConcepts(len(body.concepts), info["slots"])), loc=("concepts",))
        if (too_costly := check_render_cost(self.config.limits, width, height, body.steps, body.num_images)):
            raise ApiError(422, too_costly, loc=("steps",))

    @staticmethod
    def _response(body: GenerateRequest, task: RenderTask, result: RenderResult, manifests: dict,
                  total_s: float) -> GenerateResponse:
        def ms(seconds: float) -> float:
            return round(1000 * seconds, 3)

        used = [ConceptUsed(id=c.concept_id, weight=c.weight, trigger=manifests[c.concept_id].trigger,
                            stage=manifests[c.concept_id].stage, version=c.version or "",
                            slot=result.slot_of[c.concept_id], hot_loaded=c.concept_id in result.hot_loaded)
                for c in task.concepts]
        timings = Timings(queue_ms=ms(max(total_s - result.load_s - result.denoise_s, 0.0)),
                          adapter_load_ms=ms(result.load_s), denoise_ms=ms(result.denoise_s), total_ms=ms(total_s))
        images = [GeneratedImage(seed=s, png_base64=base64.b64encode(png).decode("ascii"))
                  for s, png in zip(result.seeds, result.pngs)]
        return GenerateResponse(images=images, concepts=used, prompt=task.prompt, seed=body.seed, steps=body.steps,
                                guidance=body.guidance, width=task.settings.width, height=task.settings.height,
                                batch_images=result.batch_images, replica=result.replica, timings=timings)

    @api.get("/v1/concepts", response_model=ConceptList, responses={503: ERRORS[503], **AUTH_ERRORS},
             summary="List the concepts this service can compose")
    async def concepts(self, principal: Generator) -> ConceptList:
        """The servable concepts the caller may use: published and made for this service's base model."""
        info = await self._model_info(self.config.request_timeout_s)
        manifests = await self.catalog.list()
        hidden = await self._others_concepts([m.concept_id for m in manifests], principal)
        return ConceptList(concepts=[
            ConceptInfo(id=m.concept_id, trigger=m.trigger, stage=m.stage, steps=m.steps, rank=m.rank,
                        version=adapter_version(m), created=m.created)
            for m in manifests if m.base_fingerprint == info["base_fingerprint"] and m.concept_id not in hidden])

    async def _visible_concept(self, concept_id: str, principal: Principal) -> None:
        """404 unless ``concept_id`` is published and the caller may use it (another owner's is unknown)."""
        hidden = await self._others_concepts([concept_id], principal)
        if concept_id in hidden or await self.catalog.lookup(concept_id) is None:
            raise UnknownConcept(concept_id)

    async def _on_registry(self, method: str, concept_id: str, *args):
        """``registry.<method>(concept_id, *args)`` in a thread, its errors mapped to HTTP answers."""
        try:
            return await asyncio.to_thread(getattr(self.catalog.registry, method), concept_id, *args)
        except KeyError:
            raise UnknownConcept(concept_id) from None
        except (FileMissing, UnsafeFile) as exc:     # messages name the concept and the file, never a path
            raise ApiError(404, str(exc), concept=concept_id) from None
        except (AdapterFileError, OSError) as exc:
            raise ApiError(503, f"concept {concept_id!r}: its files cannot be read now ({type(exc).__name__})",
                           concept=concept_id, retry_after=30) from None

    @api.get("/v1/concepts/{concept_id}/validation", response_model=ValidationList,
             responses={404: ERRORS[404], 503: ERRORS[503], **AUTH_ERRORS},
             summary="A concept's validation images",
             description="The images its training rendered from its validation prompts at the end of each stage "
                         "(published with the adapter), with their prompts.")
    async def validation_images(self, request: Request, concept_id: ConceptPath,
                                principal: Generator) -> ValidationList:
        """The current version's validation images of a concept the caller may use."""
        await self._visible_concept(concept_id, principal)
        stages = await self._on_registry("validation_images", concept_id)
        root = request.scope.get("root_path", "")
        return ValidationList(id=concept_id, images=[
            ValidationImage(stage=stage, name=name, prompt=prompt,
                            url=f"{root}/v1/concepts/{concept_id}/validation/{stage}/{name}")
            for stage, items in stages.items() for name, prompt in items])

    @api.get("/v1/concepts/{concept_id}/validation/{stage}/{name}", response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "The PNG."}, 404: ERRORS[404],
                        503: ERRORS[503], **AUTH_ERRORS},
             summary="One validation image (PNG)")
    async def validation_image(self, concept_id: ConceptPath, stage: Annotated[int, PathParam(ge=1, le=2)],
                               name: Annotated[str, PathParam(pattern=r"^[0-9]{2}\.png$")],
                               principal: Generator) -> Response:
        """The bytes of one validation image."""
        await self._visible_concept(concept_id, principal)
        png = await self._on_registry("validation_image", concept_id, stage, name)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60",
                                                               "X-Content-Type-Options": "nosniff"})

    async def _others_concepts(self, ids: list[str], principal: Principal) -> set[str]:
        """Those of ``ids`` trained through this ledger for another owner (hidden from the principal);
        concepts without an owner (published by the operator's own tools) are everyone's to use."""
        if principal.admin or self.batches is None or not ids:
            return set()
        try:
            owners = await asyncio.to_thread(self.batches.owners, ids)
        except DATABASE_ERRORS as exc:
            raise ApiError(503, f"concept owners cannot be read now ({type(exc).__name__})", retry_after=30) from None
        return {cid for cid, owner in owners.items() if owner is not None and owner != principal.owner}

    async def _on_batches(self, method: str, *args):
        """``self.batches.<method>(*args)`` in a thread, its errors mapped to HTTP answers."""
        if self.batches is None:
            raise ApiError(404, NO_BATCHES)
        try:
            return await asyncio.to_thread(getattr(self.batches, method), *args)
        except BatchRejected as exc:
            raise RequestValidationError([i.as_error() for i in exc.issues]) from None
        except UnknownBatch as exc:
            raise ApiError(404, str(exc)) from None
        except ContentConflict as exc:
            raise ApiError(409, str(exc), concept=exc.ids[0]) from None
        except NotOwner as exc:
            raise ApiError(403, str(exc), concept=exc.name if exc.kind == "concept" else None) from None
        except QuotaExceeded as exc:
            raise ApiError(429, str(exc), retry_after=self.config.auth.quota_retry_after_s) from None
        except BaseModelUnreadable as exc:
            raise ApiError(503, f"batches are unavailable: {exc}", retry_after=30) from None
        except DATABASE_ERRORS as exc:   # the message may name the database's host or file: not shown
            raise ApiError(503, f"batches are unavailable: the ledger cannot be read now ({type(exc).__name__})",
                           retry_after=30) from None
        except RayError as exc:        # the jobs are recorded; resubmitting starts a driver again
            raise ApiError(503, f"the training driver could not be started: {exc}", retry_after=30) from None
        except LedgerError as exc:     # e.g. replacing a concept that is training
            raise ApiError(409, str(exc)) from None

    @api.post("/v1/batches", status_code=202, response_model=BatchSubmitted, responses={**BATCH_ERRORS, **INVALID},
              openapi_extra=BATCH_BODY, summary="Submit a concept batch to train (idempotent)",
              description="Validates the whole batch (422 lists every problem), records its jobs in the "
                          "training ledger and makes sure a driver runs them. Data paths are relative to "
                          "<storage>/data/ on the service. Poll the Location for progress.")
    async def submit_batch(self, request: Request, response: Response, principal: Submitter) -> BatchSubmitted:
        """Validate a concept batch, record its jobs and make sure a driver trains them (202)."""
        if self.batches is None:
            raise ApiError(404, NO_BATCHES)
        raw = await _json_body(request, MAX_BATCH_BYTES)
        result = await self._on_batches("submit", raw, principal)
        response.headers["Location"] = f"{request.scope.get('root_path', '')}/v1/batches/{result.batch}"
        return result

    @api.get("/v1/batches/{name}", response_model=BatchStatus, responses=BATCH_ERRORS,
             summary="A batch's jobs: state, progress, errors, adapters")
    async def batch_status(self, name: BatchName, principal: Submitter) -> BatchStatus:
        """One of the caller's batches: its jobs with their state and progress."""
        return await self._on_batches("status", name, principal)

    @api.post("/v1/batches/{name}/cancel", response_model=BatchCancelled, responses=BATCH_ERRORS,
              summary="Cancel a batch's unfinished jobs (idempotent)",
              description="Queued jobs are cancelled at once; training ones stop at their next step and keep their "
                          "checkpoints. Only the batch's owner or an admin may cancel it (403).")
    async def cancel_batch(self, name: BatchName, principal: Submitter) -> BatchCancelled:
        """Cancel every unfinished job of one batch."""
        return await self._on_batches("cancel", name, principal)

    @api.get("/v1/batches/{name}/concepts/{concept_id}/loss", response_model=JobLoss, responses=BATCH_ERRORS,
             summary="A batch job's loss curves, per stage",
             description="The downsampled training loss of each stage so far (bucket means; the newest the "
                         "training worker sent, every ~10 s and at the stage's end). 404 for a batch that is "
                         "not the caller's or a concept that is not in it.")
    async def job_loss(self, name: BatchName, concept_id: ConceptPath, principal: Submitter) -> JobLoss:
        """One job's loss curves."""
        return await self._on_batches("loss", name, concept_id, principal)

    @api.get("/v1/batches", response_model=BatchList, responses=BATCH_ERRORS, summary="The caller's batches")
    async def batches_list(self, principal: Submitter) -> BatchList:
        """The caller's batches (an admin's: every batch of this service's storage root)."""
        return await self._on_batches("list", principal)

    async def _on_datasets(self, method: str, *args, **kwargs):
        """``self.datasets.<method>(*args)`` in a thread, its errors mapped to HTTP answers."""
        if self.datasets is None:
            raise ApiError(404, NO_DATASETS)
        try:
            return await asyncio.to_thread(getattr(self.datasets, method), *args, **kwargs)
        except DatasetRejected as exc:
            raise ApiError(exc.status, exc.detail, loc=(exc.field,) if exc.status == 422 else ()) from None
        except UnknownDataset as exc:
            raise ApiError(404, str(exc)) from None
        except TooManyDatasets as exc:
            raise ApiError(409, str(exc)) from None
        except OSError as exc:
            raise ApiError(503, f"the dataset store cannot be used now ({exc.strerror or type(exc).__name__})",
                           retry_after=30) from None

    @api.post("/v1/datasets", status_code=201, response_model=DatasetInfo, responses=DATASET_ERRORS,
              summary="Upload images (or one zip) as a dataset a batch can train on",
              description="Multipart: several `files` (PNG, JPEG or WebP, told by their content), or one zip of "
                          "images with an optional manifest.csv. Without a manifest, captions come from "
                          "`captions` (JSON: file name -> caption with [v]) or the template 'a photo of [v] "
                          "<class_word>'. A batch concept trains on it with `data` set to the answer's `data`.")
    async def upload_dataset(
            self, principal: Submitter,
            files: Annotated[list[UploadFile], File(description="The images, or one zip.")],
            captions: Annotated[Optional[str], Form(description="JSON object: file name -> caption.")] = None,
            trigger: Annotated[Optional[str], Form(description="The trigger word; in captions it may stand "
                                                               "for [v].")] = None,
            class_word: Annotated[Optional[str], Form(description="The concept's class, e.g. 'dog' "
                                                                  "(required without a manifest).")] = None,
    ) -> DatasetInfo:
        """Check and store an uploaded dataset in the caller's data area (201)."""
        if self.datasets is None:
            raise ApiError(404, NO_DATASETS)
        uploads = [Upload(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]
        return await self._on_datasets("create", principal, uploads, captions=captions, trigger=trigger,
                                       class_word=class_word)

    @api.get("/v1/datasets", response_model=DatasetList, responses=DATASET_READ_ERRORS,
             summary="The caller's datasets")
    async def datasets_list(self, principal: Submitter) -> DatasetList:
        """The caller's own datasets, newest first."""
        return await self._on_datasets("list", principal)

    @api.get("/v1/datasets/{dataset_id}", response_model=DatasetInfo, responses=DATASET_READ_ERRORS,
             summary="One of the caller's datasets")
    async def dataset(self, dataset_id: DatasetId, principal: Submitter) -> DatasetInfo:
        """One of the caller's datasets (another owner's: 404)."""
        return await self._on_datasets("get", principal, dataset_id)

    @api.delete("/v1/datasets/{dataset_id}", response_model=DatasetDeleted, responses=DATASET_READ_ERRORS,
                summary="Delete one of the caller's datasets")
    async def delete_dataset(self, dataset_id: DatasetId, principal: Submitter) -> DatasetDeleted:
        """Remove one of the caller's datasets (another owner's: 404)."""
        return await self._on_datasets("delete", principal, dataset_id)

    # the page is not part of the API (no token: the page asks for one and sends it to /v1/*)
    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        """The web page (services/page/index.html)."""
        return await self.page_asset("index.html")

    @api.get("/page/{asset}", include_in_schema=False)
    async def page_asset(self, asset: str) -> FileResponse:
        """One of the page's own files (a fixed list; anything else is 404)."""
        if asset not in PAGE_ASSETS:
            raise ApiError(404, "the page has no such file")
        return FileResponse(PAGE / asset, media_type=PAGE_ASSETS[asset], headers=PAGE_HEADERS)

    @api.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "Not ready."}},
             summary="Readiness: 200 once a generator replica has its model loaded")
    async def healthz(self):
        """Ready (200) once a generator replica has its model loaded, else 503 with the reason."""
        try:
            info = await self._model_info(HEALTH_TIMEOUT_S)
        except ApiError as exc:
            return JSONResponse(Health(status="loading", detail=exc.detail).model_dump(), status_code=503)
        return Health(status="ok", slots=info["slots"], max_side=info["max_side"])


def build_app(args: ServiceConfig | dict):
    """Serve application builder (``import_path: services.app:build_app`` in a ``serve deploy`` file)."""
    cfg = args if isinstance(args, ServiceConfig) else ServiceConfig.model_validate(args)
    spread = {"max_replicas_per_node": cfg.max_replicas_per_node} if cfg.max_replicas_per_node else {}
    generator = serve.deployment(ConceptGenerator, name="ConceptGenerator").options(
        num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests, **spread,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER,
                                                  request_routing_stats_period_s=cfg.routing_stats_period_s))
    # the ingress admits more than the generators hold (its requests mostly wait on them), so
    # overload surfaces as the generator queue's 503 with Retry-After; only far beyond that does
    # Serve's proxy answer 503 itself (it counts requests still being routed as queued)
    capacity = cfg.replicas * cfg.max_ongoing_requests + cfg.max_queued_requests + INGRESS_HEADROOM
    ingress = {"ray_actor_options": {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}}} if cfg.ingress_on_head else {}
    return GenerationAPI.options(max_ongoing_requests=capacity, max_queued_requests=capacity, **ingress).bind(
        generator.bind(cfg), cfg)
