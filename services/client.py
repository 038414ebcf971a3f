"""Python client of the purecc HTTP service, and ``purecc generate --url`` on top of it.

    client = ServiceClient("http://127.0.0.1:8000", token="pcc_...")   # or $PURECC_TOKEN
    result = client.generate("a <checkered-star> star", concepts=[("checkered-star", 1.0)], seed=7)
    result.save("out/")          # out/image_7.png, like ``purecc generate --model``
    client.submit_batch({"name": "shapes", "concepts": [{"id": "checkered-star", "trigger": "zqx",
                                                         "data": "checkered-star/manifest.csv"}]})
    client.batch_status("shapes")["done"]
    ds = client.upload_dataset("my-dog/", trigger="zqx", class_word="dog")   # images, or a folder with manifest.csv
    client.submit_batch({"name": "dogs", "concepts": [{"id": "my-dog", "trigger": "zqx", "data": ds["data"]}]})
    client.submit_with_uploads({"name": "dogs", "concepts": [{"id": "my-dog", "trigger": "zqx"}]},
                               {"my-dog": "my-dog/"}, class_word="dog")    # the same in one call

``purecc submit BATCH.yaml --url URL --upload my-dog=my-dog/ --class-word dog [--wait]`` is
``submit_cli`` below (the batch file then names no base model or storage: the service's own).
"""

from __future__ import annotations

import argparse
import copy
import base64
import io
import json
import os
import zipfile
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import quote

import requests

from cluster.progress import TRAINING, LiveTable, format_eta
from purecc.fileio import atomic_write_bytes

TOKEN_ENV = "PURECC_TOKEN"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


class ServiceError(RuntimeError):
    """A non-2xx answer: ``status`` and the service's ``detail`` (for 422, the fields at fault)."""

    def __init__(self, status: int, detail: str, body: object = None):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.body = status, detail, body


@dataclass(frozen=True)
class GenerationResult:
    """A POST /v1/generate answer: the decoded images and the rest of the response."""

    images: list[tuple[int, bytes]]            # (seed, PNG bytes)
    metadata: dict = field(default_factory=dict)  # the response without the images

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``image_<seed>.png`` files, as the local ``purecc generate`` does."""
        return [atomic_write_bytes(Path(folder) / f"image_{seed}.png", png) for seed, png in self.images]


def _detail(body: object) -> str:
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):   # FastAPI's 422 shape: [{loc, msg, ...}]
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return str(detail)


class ServiceClient:
    """Talks to one service URL with a bearer token (``token``, else ``$PURECC_TOKEN``; none: only
    /healthz or a ``--no-auth`` service answers). Not shared between threads (it keeps one HTTP session)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 300.0,
                 session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        token = token or os.environ.get(TOKEN_ENV)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, path: str, **kwargs) -> dict:
        resp = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            raise ServiceError(resp.status_code, _detail(body), body)
        return body

    def health(self) -> dict:
        """GET /healthz (``ServiceError`` 503 while no replica has its model loaded)."""
        return self._request("GET", "/healthz")

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.25) -> dict:
        """Poll /healthz until 200; raises TimeoutError with the last answer."""
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            try:
                return self.health()
            except (ServiceError, requests.ConnectionError) as exc:
                last = str(exc)
            time.sleep(interval)
        raise TimeoutError(f"{self.url} not ready after {timeout:g}s: {last}")

    def concepts(self) -> list[dict]:
        """GET /v1/concepts: the servable concepts."""
        return self._request("GET", "/v1/concepts")["concepts"]

    def submit_batch(self, spec: Mapping) -> dict:
        """POST /v1/batches: a batch spec without base_model/storage (the service's own), data paths
        relative to the service's <storage>/data/. Returns the batch's status with what was recorded;
        raises ``ServiceError`` (422 listing every problem, 409 for a changed concept without replace)."""
        return self._request("POST", "/v1/batches", json=dict(spec))

    def batch_status(self, name: str) -> dict:
        """GET /v1/batches/{name}: ``done``, ``counts`` and per-job state, progress, error and adapter."""
        return self._request("GET", f"/v1/batches/{quote(name, safe='')}")

    def batches(self) -> list[dict]:
        """GET /v1/batches: the caller's batches (an admin's: every batch), in short."""
        return self._request("GET", "/v1/batches")["batches"]

    def cancel_batch(self, name: str) -> dict:
        """POST /v1/batches/{name}/cancel: cancel the batch's unfinished jobs (owner or admin only)."""
        return self._request("POST", f"/v1/batches/{quote(name, safe='')}/cancel")

    def upload_dataset(self, folder_or_files: str | Path | Iterable[str | Path], *, trigger: str | None = None,
                       class_word: str | None = None, captions: Mapping[str, str] | None = None) -> dict:
        """POST /v1/datasets: a folder's images (PNG/JPEG/WebP by suffix; the service checks the content),
        or, when the folder holds a ``manifest.csv``, the folder zipped with it; or the given files.
        ``captions``: file name -> caption with ``[v]``; without them (and without a manifest) the service
        captions from its template with ``class_word``. Returns the dataset, whose ``data`` a batch
        concept names."""
        files = self._upload_files(folder_or_files)
        form = {k: v for k, v in (("trigger", trigger), ("class_word", class_word),
                                  ("captions", json.dumps(dict(captions)) if captions else None)) if v is not None}
        return self._request("POST", "/v1/datasets", files=[("files", f) for f in files], data=form)

    def submit_with_uploads(self, spec: Mapping, uploads: Mapping[str, str | Path], *,
                            class_word: str | None = None) -> dict:
        """Upload each ``uploads`` folder (concept id -> folder, see ``upload_dataset``) with its concept's
        trigger, set that concept's ``data`` to the new dataset, then POST the batch. Returns the
        submission's answer with ``datasets``: concept id -> the uploaded dataset."""
        spec = copy.deepcopy(dict(spec))
        concepts = {c.get("id"): c for c in spec.get("concepts", []) if isinstance(c, dict)}
        unknown = sorted(set(uploads) - set(concepts))
        if unknown:
            raise ValueError(f"--upload names concepts the batch does not have: {', '.join(unknown)}")
        datasets = {}
        for cid, folder in uploads.items():
            ds = self.upload_dataset(folder, trigger=concepts[cid].get("trigger"), class_word=class_word)
            concepts[cid]["data"] = ds["data"]
            datasets[cid] = ds
        return {**self.submit_batch(spec), "datasets": datasets}

    @staticmethod
    def _upload_files(source: str | Path | Iterable[str | Path]) -> list[tuple[str, bytes]]:
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            folder = Path(source)
            if (folder / "manifest.csv").is_file():
                buf = io.BytesIO()
                with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
                        zf.write(path, path.relative_to(folder).as_posix())
                return [(f"{folder.name or 'dataset'}.zip", buf.getvalue())]
            paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
        if not paths:
            raise ValueError(f"{source}: no image files to upload")
        return [(p.name, p.read_bytes()) for p in paths]

    def datasets(self) -> list[dict]:
        """GET /v1/datasets: the caller's datasets, newest first."""
        return self._request("GET", "/v1/datasets")["datasets"]

    def dataset(self, dataset_id: str) -> dict:
        """GET /v1/datasets/{id}: one of the caller's datasets."""
        return self._request("GET", f"/v1/datasets/{quote(dataset_id, safe='')}")

    def delete_dataset(self, dataset_id: str) -> dict:
        """DELETE /v1/datasets/{id}: remove one of the caller's datasets."""
        return self._request("DELETE", f"/v1/datasets/{quote(dataset_id, safe='')}")

    def generate(self, prompt: str, *, concepts: Iterable[tuple[str, float]] | Mapping[str, float] = (),
                 seed: int = 0, steps: int = 28, guidance: float = 7.0, width: int | None = None,
                 height: int | None = None, num_images: int = 1, negative_prompt: str = "") -> GenerationResult:
        """POST /v1/generate: ``concepts`` as (id, weight) pairs or a mapping; <id> in the prompt
        stands for that concept's trigger word."""
        pairs = concepts.items() if isinstance(concepts, Mapping) else concepts
        payload = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
                   "guidance": guidance, "num_images": num_images,
                   "concepts": [{"id": cid, "weight": float(w)} for cid, w in pairs]}
        payload.update({k: v for k, v in (("width", width), ("height", height)) if v is not None})
        body = self._request("POST", "/v1/generate", json=payload)
        images = [(img["seed"], base64.b64decode(img["png_base64"])) for img in body.pop("images")]
        return GenerationResult(images, body)


def generate_cli(args: argparse.Namespace) -> int:
    """``purecc generate --url URL ...``: same flags and output files as the local mode; the token
    from ``--token`` where the parser has it, else ``$PURECC_TOKEN``."""
    client = ServiceClient(args.url, token=getattr(args, "token", None))
    try:
        result = client.generate(args.prompt, concepts=list(args.concept), seed=args.seed, steps=args.steps,
                                 guidance=args.guidance, width=args.width, height=args.height,
                                 num_images=args.num_images, negative_prompt=args.negative_prompt)
    except (ServiceError, requests.RequestException) as exc:
        print(f"error: {args.url}: {exc}", file=sys.stderr)
        return 1
    for path in result.save(args.out):
        print(path)
    return 0


def _uploads(pairs: Iterable[str]) -> dict[str, Path]:
    uploads = {}
    for pair in pairs:
        cid, sep, folder = pair.partition("=")
        if not sep or not cid or not folder:
            raise ValueError(f"--upload {pair!r}: expected CONCEPT_ID=FOLDER")
        if not Path(folder).is_dir():
            raise ValueError(f"--upload {pair!r}: {folder} is not a folder")
        uploads[cid] = Path(folder)
    return uploads


def status_row(job: Mapping) -> tuple[str, ...]:
    """One job of ``GET /v1/batches/{name}`` as the cells of ``purecc status``'s table (``COLUMNS``)."""
    training = job["state"] in TRAINING
    state = job["state"] + (" (cancelling)" if job.get("cancel_requested") and training else "")
    step = f"{job.get('step') or 0}/{job.get('total') or '?'}" if training else "-"
    loss = f"{job['loss']:.4f}" if job.get("loss") is not None and training and job.get("step") else "-"
    note = (job.get("adapter") or "") if job["state"] == "published" else ""
    if job["state"] == "failed" and job.get("error"):
        note = job["error"].strip().splitlines()[-1][:70]
    return (job["id"], state, str(job.get("stage") or "-"), step, loss, format_eta(job.get("eta_s")),
            str(job.get("attempts", 0)), note)


def submit_cli(args: argparse.Namespace) -> int:
    """``purecc submit BATCH --url URL [--upload ID=FOLDER ...] [--wait]``: the batch (YAML/JSON) over
    HTTP, each ``--upload`` folder uploaded first as that concept's dataset; ``--wait`` polls its
    status until done (1 if a job failed)."""
    import yaml

    try:
        spec = yaml.safe_load(Path(args.batch_file).read_text())
        if not isinstance(spec, dict):
            raise ValueError("the batch file must hold a mapping")
        uploads = _uploads(args.upload or [])
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = ServiceClient(args.url, token=getattr(args, "token", None))
    try:
        result = client.submit_with_uploads(spec, uploads, class_word=getattr(args, "class_word", None))
        for cid, ds in result["datasets"].items():
            print(f"uploaded {cid}: dataset {ds['id']} ({ds['images']} images) -> data {ds['data']}")
        print(f"batch {result['batch']}: {len(result['added'])} new, {len(result['unchanged'])} unchanged, "
              f"{len(result['replaced'])} replaced, {len(result['requeued'])} requeued; driver {result['driver']}",
              flush=True)
        status = result
        if args.wait:                # one table, redrawn in place on a terminal; changed rows in a log
            table = LiveTable(interval=0.0)
            while not status["done"]:
                table.draw([status_row(j) for j in status["jobs"]])
                time.sleep(getattr(args, "interval", 2.0))
                status = client.batch_status(result["batch"])
            table.draw([status_row(j) for j in status["jobs"]], force=True)
    except (ServiceError, requests.RequestException, ValueError) as exc:
        print(f"error: {args.url}: {exc}", file=sys.stderr)
        return 1
    return 1 if any(j["state"] == "failed" for j in status["jobs"]) else 0
