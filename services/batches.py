"""Concept batches over HTTP: a request becomes a cluster ``BatchSpec`` under the service's storage
root, its jobs go into the training ledger, and a driver is kept running for them.

The service fixes what a user may not choose: the base model (its own), the storage root, and with
it the ledger (``<storage>/ledger.sqlite``) and the registry the adapters are published to
(``<storage>/adapters/``). Concept data is read from the caller's own data area only,
``<storage>/data/<owner>/`` (an admin's is ``<storage>/data/``, every owner's): a manifest path is
relative, without ``..``, and the manifest and every image it names resolve (symlinks followed)
inside that folder; nothing outside it is ever opened.

Ownership (``services.auth.Principal``): a batch and each of its concepts belong to the owner who
first submitted them. A caller lists and reads only its own batches (another owner's answers 404,
as if it did not exist); submitting to another owner's batch name or concept id, replacing or
cancelling another owner's batch is refused (``NotOwner``, 403); an admin may do all of it. Status
bodies name adapters by their path relative to the storage root, never an absolute server path.

Validation reports every problem at once, in FastAPI's 422 shape: the request's own schema
(``services.schemas``, tighter bounds than cluster's), the data paths, then ``cluster.spec``'s
validation of the batch (manifests, recipes, duplicate ids), one problem per field.

Each manifest is parsed once (by ``cluster.spec``'s validation, whose parsed manifests the jobs
are hashed from); before that only its image paths are read, without opening any image, to refuse
one outside the data folder.

The ledger is opened by the ingress and by the driver it starts, both on the ingress's node (SQLite
is not safe across hosts). The driver is ``cluster.api.start_driver``'s detached zero-CPU Ray actor
running ``cluster.api.resume``: it outlives the request and the ingress replica, and exits once no
job is left. It is started unless a live driver holds the ledger; two started at once are harmless
(the ledger's driver lease lets one schedule, the other exits).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from math import isfinite
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster.api import UnsatisfiableResources, check_resources, resume_unfinished
from cluster.ledger import ACTIVE, JobLedger, JobRecord, NotOwner, Quota
from cluster.ledger_sql import is_postgres
from cluster.progress import TRAINING, eta_of, progress_of
from cluster.spec import BatchSpecError, ValidatedBatch
from purecc.data import ManifestError, manifest_image_paths

from .auth import Principal
from .schemas import (MAX_BATCH_CONCEPTS, BatchCancelled, BatchList, BatchRequest, BatchStatus, BatchSubmitted,
                      BatchSummary, JobLoss, JobStatus, StageCurve)

DATA_DIR = "data"
LEDGER_FILE = "ledger.sqlite"
NAME_MAX = 255                 # bytes of one path component on Linux file systems
FIXED = {"base_model": "its own model", "storage": "its storage root", "ledger": "<storage>/ledger.sqlite"}


@dataclass(frozen=True)
class Issue:
    """One problem of a request, located in its body (FastAPI's ``loc`` without the leading "body")."""

    loc: tuple
    msg: str
    type: str = "value_error"

    def as_error(self) -> dict:
        """This issue as one entry of FastAPI's 422 ``detail`` list."""
        return {"loc": ("body", *self.loc), "msg": self.msg, "type": self.type}


class BatchRejected(ValueError):
    """A rejected request; ``issues`` lists every problem (answered 422)."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("; ".join(f"{'.'.join(map(str, i.loc)) or '(body)'}: {i.msg}" for i in issues))


class UnknownBatch(KeyError):
    """No job of the batch ``name`` is in the ledger (answered 404)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"batch {self.name!r} is not in the ledger"


class UnknownJob(UnknownBatch):
    """The concept is not a member of the batch (answered 404 like an unknown batch)."""

    def __init__(self, name: str, concept_id: str):
        super().__init__(name)
        self.concept_id = concept_id

    def __str__(self) -> str:
        return f"concept {self.concept_id!r} is not in batch {self.name!r}"


class BaseModelUnreadable(RuntimeError):
    """The service's own model folder cannot be read where the ingress runs: not the request's fault."""


# ----- validation ------------------------------------------------------------------------------
def confine(value: str, root: Path, area: str = f"<storage>/{DATA_DIR}/") -> Path:
    """``value``, a path relative to ``root`` (resolved), resolved with symlinks followed; raises
    ValueError saying why it is refused (absolute, URI, ``..``, or it resolves outside ``root``).
    ``area`` is how messages name ``root`` (never the server path)."""
    if "\x00" in value:
        raise ValueError("the path contains a NUL character")
    if "://" in value:
        raise ValueError(f"{value!r} must be a path relative to {area}, not a URI")
    rel = Path(value)
    if rel.is_absolute():
        raise ValueError(f"{value!r} must be relative to {area}, not an absolute path")
    if ".." in rel.parts:
        raise ValueError(f"{value!r} must not contain '..'")
    if any(len(part.encode()) > NAME_MAX for part in rel.parts):
        raise ValueError(f"a component of the path is longer than {NAME_MAX} bytes")
    try:
        path = (root / rel).resolve()
        path.exists()            # stat once here: any error the file system has for this name is raised now
    except OSError as exc:       # a name too long for the file system, a symlink loop
        raise ValueError(f"{value!r} cannot be resolved ({exc.strerror or type(exc).__name__})") from None
    if not path.is_relative_to(root):
        raise ValueError(f"{value!r} resolves outside {area} (through a symlink)")
    return path


def data_area(storage: Path, principal: Principal) -> tuple[Path, str]:
    """The folder a principal's data paths are relative to, and how messages name it."""
    if principal.admin:
        return storage / DATA_DIR, f"<storage>/{DATA_DIR}/"
    return storage / DATA_DIR / principal.owner, f"<storage>/{DATA_DIR}/{principal.owner}/"


def _images_outside(manifest: Path, root: Path, area: str) -> str | None:
    """Why the manifest's images are refused (one outside ``root``), or None."""
    try:
        images = manifest_image_paths(manifest)
    except ManifestError:
        return None                    # cluster.spec reports a missing or unreadable manifest
    for row, image in enumerate(images, 1):
        if not image.resolve().is_relative_to(root):
            return f"row {row}: its image resolves outside {area}"
    return None


def _label(raw: Any, i: int) -> str:
    cid = raw.get("id") if isinstance(raw, dict) else None
    return f"concept {cid!r} (#{i + 1})" if isinstance(cid, str) and len(cid) <= 64 else f"concept #{i + 1}"


def _issue(loc: tuple, msg: str, type_: str, concepts: list) -> Issue:
    if len(loc) >= 2 and loc[0] == "concepts" and isinstance(loc[1], int) and loc[1] < len(concepts):
        msg = f"{_label(concepts[loc[1]], loc[1])}: {msg}"
    return Issue(loc, msg, type_)


def _field_loc(field: str) -> tuple:
    """cluster.spec's dotted field back into a loc (digits become list indices)."""
    if field in ("(root)", "(file)"):
        return ()
    return tuple(int(p) if p.isdigit() else p for p in field.split("."))


def _order(issue: Issue) -> tuple[int, int]:
    """The batch's own fields first, then concept by concept."""
    loc = issue.loc
    if loc[:1] == ("concepts",):
        return 1, loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1
    return 0, 0


def batch_from_request(raw: Any, *, base_model: str, storage: Path, data_root: Path | None = None,
                       area: str = f"<storage>/{DATA_DIR}/") -> tuple[ValidatedBatch, BatchRequest]:
    """Validate a request body into a cluster batch (data confined to ``data_root``, by default
    ``<storage>/data/``, named ``area`` in messages), with the manifests its validation parsed;
    raises ``BatchRejected`` listing every problem."""
    if not isinstance(raw, dict):
        raise BatchRejected([Issue((), "expected a JSON object (the batch)", "model_attributes_type")])
    issues = [Issue((k,), f"set by the service ({why}); leave it out", "extra_forbidden")
              for k, why in FIXED.items() if k in raw]
    body = {k: v for k, v in raw.items() if k not in FIXED}
    concepts = body.get("concepts") if isinstance(body.get("concepts"), list) else []
    request = None
    try:
        request = BatchRequest.model_validate(body)
    except ValidationError as exc:
        issues += [_issue(tuple(e["loc"]), e["msg"], e["type"], concepts) for e in exc.errors()]
    root = (data_root or storage / DATA_DIR).resolve()
    checked = []
    for i, c in enumerate(concepts[:MAX_BATCH_CONCEPTS]):     # beyond the bound: reported by the schema
        if not isinstance(c, dict):
            checked.append(c)
            continue
        path = None
        if isinstance(c.get("data"), str) and not any(x.loc == ("concepts", i, "data") for x in issues):
            try:
                path = confine(c["data"], root, area)
                why = _images_outside(path, root, area)
            except ValueError as exc:
                why = str(exc)
            if why:
                issues.append(_issue(("concepts", i, "data"), why, "value_error", concepts))
                path = None
        # a refused path is never opened: cluster.spec gets the data folder itself (no manifest)
        checked.append({**c, "data": str(path or root)})
    head = {k: body[k] for k in ("name", "resources", "defaults", "validation") if k in body}
    data = {**head, "base_model": str(Path(base_model).resolve()), "storage": str(storage), "concepts": checked}
    try:
        batch = ValidatedBatch.from_dict(data, source="request", base_dir=storage)
    except BatchSpecError as exc:
        batch = None
        taken = {x.loc for x in issues}
        for p in exc.problems:
            if p.field == "base_model":
                raise BaseModelUnreadable(f"the service's model cannot be read here: {p.message}") from None
            loc = _field_loc(p.field)
            if loc not in taken:
                issues.append(_issue(loc, p.message, "value_error", concepts))
                taken.add(loc)
    if issues:
        raise BatchRejected(sorted(issues, key=_order))
    assert batch is not None and request is not None
    return batch, request


# ----- the batches of one storage root ----------------------------------------------------------
def _finite(x: float | None) -> float | None:
    return x if x is not None and isfinite(x) else None


def _relative(path: str | None, storage: Path) -> str | None:
    """A published adapter's folder relative to the storage root (never an absolute server path)."""
    if not path:
        return None
    local = Path(path)
    if local.is_absolute() and local.is_relative_to(storage):
        return local.relative_to(storage).as_posix()
    return None if local.is_absolute() or "://" in path else local.as_posix()


def job_status(rec: JobRecord, storage: Path) -> JobStatus:
    """A ledger record as the API shows it (non-finite numbers as null, the adapter storage-relative). A
    training job shows the stage it is in from its first moment (step 0 of the recipe's steps before the
    worker's first report) and the seconds left in it as of now, as ``purecc status`` does."""
    prog = progress_of(rec)
    stage, (step, total) = (TRAINING[rec.state], prog) if prog is not None else (rec.stage, (rec.step, rec.total))
    eta = eta_of(rec, time.time()) if prog is not None else None
    eta = max(0.0, eta) if eta is not None else None
    return JobStatus(id=rec.concept_id, state=rec.state, stage=stage, step=step, total=total,
                     loss=_finite(rec.loss), eta_s=_finite(eta), attempts=rec.attempts,
                     cancel_requested=rec.cancel_requested, error=rec.error,
                     adapter=_relative(rec.adapter, storage),
                     submitted_at=rec.submitted_at, updated_at=rec.updated_at, stage1_started=rec.stage1_started,
                     stage1_ended=rec.stage1_ended, stage2_started=rec.stage2_started,
                     stage2_ended=rec.stage2_ended, published_at=rec.published_at)


def _summary(name: str, jobs: list[JobRecord]) -> dict:
    return {"batch": name, "done": not any(j.state in ACTIVE for j in jobs),
            "counts": dict(Counter(j.state for j in jobs))}


class StorageBatches:
    """The batches of one storage root as the ingress sees them, per principal. Methods block (SQLite,
    data files): call them from a thread. The ledger is created by the first submission, never by a read."""

    def __init__(self, storage: str, base_model: str, quota: Quota | None = None, ledger: str | None = None,
                 slot_rank: int | None = None):
        self.storage = Path(storage).expanduser().resolve()
        self.slot_rank = slot_rank       # the serving slots' LoRA rank: a concept trained at another is unservable
        self.base_model = str(Path(base_model).expanduser().resolve())
        self.ledger_path: Path | str = ledger if is_postgres(ledger) else self.storage / LEDGER_FILE
        self.quota = quota
        self._ledger: JobLedger | None = None
        self._lock = threading.Lock()

    def _exists(self) -> bool:
        return is_postgres(self.ledger_path) or Path(self.ledger_path).is_file()

    def _open(self, create: bool) -> JobLedger | None:
        with self._lock:
            if self._ledger is None and (create or self._exists()):
                self._ledger = JobLedger(self.ledger_path)
            return self._ledger

    def submit(self, raw: Any, principal: Principal) -> BatchSubmitted:
        """Validate (data in the principal's area), record for the principal (idempotent;
        ``ContentConflict`` for a changed concept without ``replace``, ``NotOwner`` for another owner's
        concept or batch, ``QuotaExceeded`` past a quota) and make sure a driver runs the jobs."""
        root, area = data_area(self.storage, principal)
        batch, request = batch_from_request(raw, base_model=self.base_model, storage=self.storage, data_root=root,
                                            area=area)
        try:
            jobs = batch.jobs()          # hashed from the manifests as validated: none is read again
        except OSError as exc:           # an image went away since it was checked
            raise BatchRejected([Issue(("concepts",), f"a data file went away: {exc.strerror}")]) from None
        misfits = [Issue(("concepts", i, "overrides", "stage2", "rank"),
                         f"rank {job.stage2.rank} does not fit this service's adapter slots (rank {self.slot_rank}): "
                         f"the trained concept could not be served; leave it unset or set {self.slot_rank}")
                   for i, job in enumerate(jobs) if self.slot_rank is not None and job.stage2.rank != self.slot_rank]
        if misfits:
            raise BatchRejected(misfits)
        try:                             # a cluster that can never place the workers: refused, nothing recorded
            check_resources(batch.spec.resources)
        except UnsatisfiableResources as exc:
            field, _, why = str(exc).partition(": ")
            raise BatchRejected([Issue(tuple(field.split(".")), why or str(exc))]) from None
        ledger = self._open(create=True)
        report = ledger.submit(jobs, replace=request.replace, requeue=request.requeue, owner=principal.owner,
                               admin=principal.admin, quota=self.quota)
        if not ledger.jobs(ACTIVE):
            driver = "idle"
        else:                            # one reservation per wave of submissions: never two drivers
            driver = "started" if resume_unfinished(ledger.path) is not None else "running"
        return BatchSubmitted(**self.status(batch.spec.name, principal).model_dump(), added=report.added,
                              unchanged=report.unchanged, replaced=report.replaced, requeued=report.requeued,
                              driver=driver)

    def resume(self) -> bool:
        """At service start: start a driver when the ledger has unfinished jobs and none is alive (a
        restarted service resumes queued and interrupted training by itself). True when one was started."""
        return self._exists() and resume_unfinished(self.ledger_path) is not None

    def _visible_jobs(self, name: str, principal: Principal) -> tuple[JobLedger, list[JobRecord]]:
        """The ledger and the member jobs of a batch the principal may see; ``UnknownBatch`` otherwise."""
        ledger = self._open(create=False)
        try:
            owner = ledger.batch_owner(name) if ledger else None
        except KeyError:
            raise UnknownBatch(name) from None
        if ledger is None or not (principal.admin or owner == principal.owner):
            raise UnknownBatch(name)
        jobs = ledger.batch_jobs(name)
        if not jobs:
            raise UnknownBatch(name)
        return ledger, jobs

    def status(self, name: str, principal: Principal) -> BatchStatus:
        """The batch's jobs; ``UnknownBatch`` if it is not in the ledger or not the principal's."""
        _, jobs = self._visible_jobs(name, principal)
        return BatchStatus(**_summary(name, jobs), jobs=[job_status(j, self.storage) for j in jobs])

    def loss(self, name: str, concept_id: str, principal: Principal) -> JobLoss:
        """The loss curves of one job of a batch the principal may see (``UnknownBatch`` otherwise,
        ``UnknownJob`` for a concept that is not in that batch)."""
        ledger, jobs = self._visible_jobs(name, principal)
        job = next((j for j in jobs if j.concept_id == concept_id), None)
        if job is None:
            raise UnknownJob(name, concept_id)
        curves = ledger.curves(concept_id)
        return JobLoss(id=concept_id, state=job.state, stages={str(k): StageCurve(**v) for k, v in curves.items()})

    def list(self, principal: Principal) -> BatchList:
        """The principal's batches (an admin's: every batch), in short."""
        ledger = self._open(create=False)
        rows = ledger.batches(None if principal.admin else principal.owner) if ledger else []
        out = []
        for name, _ in rows:
            jobs = ledger.batch_jobs(name)
            out.append(BatchSummary(**_summary(name, jobs), submitted_at=min(j.submitted_at for j in jobs),
                                    updated_at=max(j.updated_at for j in jobs)))
        return BatchList(batches=out)

    def cancel(self, name: str, principal: Principal) -> BatchCancelled:
        """Cancel every unfinished job of the batch (idempotent): ``UnknownBatch`` when it is not in
        the ledger, ``NotOwner`` when it is another owner's (an admin may cancel any)."""
        ledger = self._open(create=False)
        try:
            owner = ledger.batch_owner(name) if ledger else None
        except KeyError:
            raise UnknownBatch(name) from None
        if ledger is None:
            raise UnknownBatch(name)
        if not (principal.admin or owner == principal.owner):
            raise NotOwner("batch", name)
        messages = [ledger.request_cancel(j.concept_id) for j in ledger.batch_jobs(name)]
        return BatchCancelled(**self.status(name, principal).model_dump(), messages=messages)

    def owners(self, concept_ids: list[str]) -> dict[str, str | None]:
        """The owners of those concepts that were trained through this ledger."""
        ledger = self._open(create=False)
        return ledger.owners(concept_ids) if ledger else {}
