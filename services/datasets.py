"""Concept datasets uploaded over HTTP, into the owner's data area where batches read them.

    POST   /v1/datasets        multipart: image files (+ captions JSON, trigger, class_word), or one zip
    GET    /v1/datasets        the caller's datasets
    GET    /v1/datasets/{id}   one of them
    DELETE /v1/datasets/{id}   remove it

A dataset lives in ``<storage>/data/<owner>/datasets/<id>/``: ``imgs/`` with the images under sanitized
names, ``manifest.csv`` in the project's format (``purecc.data.COLUMNS``) and ``dataset.json``. A batch
concept names it with ``data: datasets/<id>/manifest.csv`` (relative to the owner's area, so
``services.batches`` confines it; another owner's id resolves to a file that does not exist there).
The folder is assembled in a temporary sibling and renamed into place, so a dataset is whole or absent.

Bounds (``DatasetBounds``), each refused with a 4xx naming the field and the problem: the body itself is
bounded by ``LimitSettings.max_upload_bytes`` (413, counted on received bytes before the app runs); file
count, per-file size, format (decoded by Pillow: PNG, JPEG, WebP; the name's extension is ignored), pixel
count read from the header before any decoding (and Pillow's own ``MAX_IMAGE_PIXELS`` guard, which raises
on open past twice its limit), captions JSON shape. A zip is checked entry by entry on its central
directory before anything is extracted: names confined (no absolute path, ``..``, backslash or drive),
no symlinks, only stored/deflated entries, entry count, each entry's and the total uncompressed size, and
the compression ratio of large entries; reads are then bounded by the declared size (a lying header is
refused). Datasets per owner are bounded too (409).

Zip handling is written here because ``zipfile``'s own ``extractall`` sanitizes names but checks neither
sizes, ratios nor symlink entries; ``shutil.unpack_archive`` does even less.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import stat
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from purecc.data import COLUMNS, MAX_IMAGE_PIXELS, PLACEHOLDER, ManifestError, read_concept_manifest
from purecc.fileio import atomic_write_bytes, atomic_write_json, fsync_dir
from purecc.ids import TRIGGER_PATTERN

from .auth import Principal

DATASETS_DIR = "datasets"
MANIFEST = "manifest.csv"
META = "dataset.json"
FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
DATASET_ID = re.compile(r"^[0-9a-f]{16}$")
CLASS_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9 '-]{0,31}$")
_TRIGGER = re.compile(TRIGGER_PATTERN)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_CAPTION_CHARS = 300
RATIO_FLOOR = 1024 * 1024      # entries smaller than this may compress well (a CSV of blanks) harmlessly


class DatasetBounds(BaseModel):
    """What one upload may hold (the body's size is ``LimitSettings.max_upload_bytes``)."""

    max_files: int = Field(100, ge=1, description="Images in one dataset.")
    max_file_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Bytes of one image (or zip entry).")
    max_pixels: int = Field(min(MAX_IMAGE_PIXELS, 25_000_000), ge=1, description="Width x height of one image, "
                            "read from its header before decoding.")
    max_zip_entries: int = Field(200, ge=1, description="Entries (files) in an uploaded zip.")
    max_unpacked_bytes: int = Field(128 * 1024 * 1024, ge=1024, description="Uncompressed bytes of a zip.")
    max_ratio: float = Field(100.0, gt=1, description="Uncompressed/compressed size of a zip entry past 1 MiB.")
    max_datasets: int = Field(20, ge=1, description="Datasets one owner may hold.")


class DatasetInfo(BaseModel):
    """An uploaded dataset."""

    id: str = Field(description="The dataset id.")
    data: str = Field(description="What a batch concept's `data` names to train on it (relative to the "
                                  "caller's data area).")
    images: int = Field(description="Images in the dataset.")
    bytes: int = Field(description="Their size in bytes.")
    trigger: str | None = Field(None, description="The trigger word given at upload (captions use [v] for it).")
    class_word: str | None = Field(None, description="The class word given at upload.")
    captions: str = Field(description="Where the captions came from: 'template', 'given' or 'manifest'.")
    created: float = Field(description="Upload time, seconds since the epoch.")


class DatasetList(BaseModel):
    """The caller's datasets, newest first."""

    datasets: list[DatasetInfo]


class DatasetDeleted(BaseModel):
    """A removed dataset."""

    id: str
    deleted: bool = True


class DatasetRejected(ValueError):
    """An upload refused: ``status`` (413 or 422), the form ``field`` at fault and why."""

    def __init__(self, field: str, detail: str, status: int = 422):
        super().__init__(detail)
        self.field, self.detail, self.status = field, detail, status


class UnknownDataset(LookupError):
    """No dataset of that id in the caller's area."""


class TooManyDatasets(Exception):
    """The owner holds the most datasets allowed."""


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the client's name (never used as a path) and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class _Image:
    source: str          # the name the client knows it by (captions, manifest rows)
    stored: str          # imgs/<n>-<sanitized>.<ext>
    data: bytes


# ----- images -----------------------------------------------------------------------------------
def _display(name: str) -> str:
    return repr(name[:80])


def check_image(name: str, data: bytes, bounds: DatasetBounds, field: str) -> str:
    """The image's file extension (from its decoded format); refuses non-images, other formats and
    bombs (pixel count from the header, before ``load``) with ``DatasetRejected``."""
    if len(data) > bounds.max_file_bytes:
        raise DatasetRejected(field, f"{_display(name)} is {len(data)} bytes, more than the "
                                     f"{bounds.max_file_bytes} allowed per image", status=413)
    fmt = "its format"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format, img.size
                if fmt not in FORMATS:
                    raise DatasetRejected(field, f"{_display(name)} is {fmt}, not one of the accepted formats "
                                                 f"{sorted(FORMATS)}")
                if w * h > bounds.max_pixels:
                    raise DatasetRejected(field, _bomb(name, w, h, bounds))
                img.load()
    except DatasetRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DatasetRejected(field, f"{_display(name)} declares more pixels than {bounds.max_pixels} "
                                     "(refused as a possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise DatasetRejected(field, f"{_display(name)} is not an image (PNG, JPEG or WebP)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetRejected(field, f"{_display(name)} cannot be decoded as {fmt}: "
                                     f"{type(exc).__name__}") from None
    return FORMATS[fmt]


def _bomb(name: str, w: int, h: int, bounds: DatasetBounds) -> str:
    return (f"{_display(name)} is {w}x{h} = {w * h} pixels, more than the {bounds.max_pixels} allowed "
            "(refused before decoding as a possible decompression bomb)")


def _stored_name(index: int, source: str, ext: str) -> str:
    """``imgs/<index>-<stem>.<ext>``: the client's base name reduced to safe characters."""
    stem = _UNSAFE.sub("_", PurePosixPath(source.replace("\\", "/")).stem).strip("._")[:48] or "image"
    return f"imgs/{index:03d}-{stem}.{ext}"


# ----- zip --------------------------------------------------------------------------------------
def _entry_path(name: str) -> PurePosixPath:
    """A zip entry's name as a confined relative path, else ``DatasetRejected``."""
    if "\\" in name or "\x00" in name or re.match(r"^[A-Za-z]:", name):
        raise DatasetRejected("files", f"zip entry {_display(name)} has a backslash, NUL or drive in its name")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise DatasetRejected("files", f"zip entry {_display(name)} is an absolute path")
    if ".." in path.parts:
        raise DatasetRejected("files", f"zip entry {_display(name)} contains '..' (it would land outside "
                                       "the dataset)")
    return path


def _zip_members(data: bytes, bounds: DatasetBounds) -> dict[str, bytes]:
    """The zip's files by confined name, every bound checked on the central directory first."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        raise DatasetRejected("files", f"the zip cannot be read: {exc}") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > bounds.max_zip_entries:
            raise DatasetRejected("files", f"the zip has {len(infos)} entries, more than the "
                                           f"{bounds.max_zip_entries} allowed")
        total = 0
        for info in infos:
            _entry_path(info.orig_filename)      # as stored: ``filename`` is cut at a NUL by zipfile
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetRejected("files", f"zip entry {_display(info.filename)} is a symbolic link")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
                raise DatasetRejected("files", f"zip entry {_display(info.filename)} is encrypted or uses an "
                                               "unsupported compression (stored or deflated only)")
            if info.file_size > bounds.max_file_bytes:
                raise DatasetRejected("files", f"zip entry {_display(info.filename)} unpacks to {info.file_size} "
                                               f"bytes, more than the {bounds.max_file_bytes} allowed per file",
                                      status=413)
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > RATIO_FLOOR and ratio > bounds.max_ratio:
                raise DatasetRejected("files", f"zip entry {_display(info.filename)} compresses {ratio:.0f}:1, "
                                               f"more than the {bounds.max_ratio:g}:1 allowed (a zip bomb?)")
            total += info.file_size
        if total > bounds.max_unpacked_bytes:
            raise DatasetRejected("files", f"the zip unpacks to {total} bytes, more than the "
                                           f"{bounds.max_unpacked_bytes} allowed", status=413)
        members = {}
        for info in infos:
            path = _entry_path(info.filename)
            if path.parts[0] == "__MACOSX" or path.name.startswith("."):
                continue
            try:
                with zf.open(info) as f:
                    body = f.read(info.file_size + 1)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:   # bad CRC, cut, zlib
                raise DatasetRejected("files", f"zip entry {_display(info.filename)} cannot be read (corrupt, or "
                                               f"not the size its header declares): {type(exc).__name__}: "
                                               f"{str(exc)[:120]}") from None
            if len(body) != info.file_size:
                raise DatasetRejected("files", f"zip entry {_display(info.filename)} is not the size its "
                                               "header declares")
            members[str(path)] = body
        return members


# ----- captions and manifests -------------------------------------------------------------------
def _captions(raw: str | None, names: set[str], trigger: str | None) -> dict[str, str]:
    """The captions JSON: a map of uploaded file name to caption holding ``[v]`` (or the trigger)."""
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise DatasetRejected("captions", f"captions is not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise DatasetRejected("captions", 'captions must be a JSON object of file name to caption, e.g. '
                                          '{"01.png": "a photo of [v] dog on a beach"}')
    out = {}
    for name, caption in value.items():
        if name not in names:
            raise DatasetRejected("captions", f"captions names {_display(name)}, which is not an uploaded image")
        caption = " ".join(caption.split())
        if trigger and PLACEHOLDER not in caption:
            caption = re.sub(rf"\b{re.escape(trigger)}\b", PLACEHOLDER, caption)
        if PLACEHOLDER not in caption or len(caption) > MAX_CAPTION_CHARS:
            raise DatasetRejected("captions", f"the caption of {_display(name)} must contain {PLACEHOLDER} (or the "
                                              f"trigger word) and have at most {MAX_CAPTION_CHARS} characters")
        out[name] = caption
    return out


def _row(image: _Image, caption: str | None, class_word: str) -> dict[str, str]:
    prompt = caption or f"a photo of {PLACEHOLDER} {class_word}"
    base = " ".join(prompt.replace(PLACEHOLDER, "").split())
    if not caption:
        base = f"a photo of a {class_word}"
    return {"image_path": image.stored, "prompt": prompt, "base_prompt": base,
            "target_prompt": f"{PLACEHOLDER} {class_word}", "instance_word": class_word}


def _manifest_rows(text: bytes, images: dict[str, _Image]) -> list[dict[str, str]]:
    """An uploaded manifest's rows with ``image_path`` rewritten to the stored names."""
    try:
        reader = csv.DictReader(io.StringIO(text.decode("utf-8-sig")))
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetRejected("files", f"{MANIFEST} in the zip is not a UTF-8 CSV: {exc}") from None
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DatasetRejected("files", f"{MANIFEST} in the zip lacks the column(s) {missing} (expected "
                                       f"{list(COLUMNS)})")
    out = []
    for n, row in enumerate(rows, 1):
        name = str(PurePosixPath(row["image_path"] or ""))
        if name not in images:
            raise DatasetRejected("files", f"{MANIFEST} row {n}: image_path {_display(row['image_path'] or '')} "
                                           "is not an image in the zip")
        out.append({**{c: row[c] or "" for c in COLUMNS}, "image_path": images[name].stored})
    if not out:
        raise DatasetRejected("files", f"{MANIFEST} in the zip has no rows")
    return out


# ----- the store --------------------------------------------------------------------------------
def owner_area(storage: Path, principal: Principal) -> Path:
    """Where the principal's uploads go: its own data folder (an admin's too, under its owner name)."""
    return storage / "data" / principal.owner


def data_reference(principal: Principal, dataset_id: str) -> str:
    """The ``data`` a batch concept names: relative to ``batches.data_area`` of the same principal."""
    rel = f"{DATASETS_DIR}/{dataset_id}/{MANIFEST}"
    return f"{principal.owner}/{rel}" if principal.admin else rel


class StorageDatasets:
    """Datasets under ``<storage>/data/<owner>/datasets/``. Every method blocks on files: call them
    from a thread."""

    def __init__(self, storage: str | Path, bounds: DatasetBounds | None = None):
        self.storage = Path(storage)
        self.bounds = bounds or DatasetBounds()

    def _root(self, principal: Principal) -> Path:
        return owner_area(self.storage, principal) / DATASETS_DIR

    def create(self, principal: Principal, uploads: list[Upload], *, captions: str | None = None,
               trigger: str | None = None, class_word: str | None = None) -> DatasetInfo:
        """Check every bound, then write the dataset atomically; returns it."""
        b = self.bounds
        if trigger is not None and not _TRIGGER.fullmatch(trigger):
            raise DatasetRejected("trigger", f"trigger {_display(trigger)} is not a trigger word "
                                             f"(expected {TRIGGER_PATTERN})")
        if class_word is not None and not CLASS_WORD.fullmatch(class_word):
            raise DatasetRejected("class_word", f"class_word {_display(class_word)} must be a word or two: "
                                                "letters, digits, spaces, ' or -, at most 32 characters")
        if not uploads:
            raise DatasetRejected("files", "no file uploaded")
        manifest, sources = None, uploads
        if len(uploads) == 1 and (uploads[0].data[:4] == b"PK\x03\x04"      # a zip, even a cut one
                                  or zipfile.is_zipfile(io.BytesIO(uploads[0].data))):
            members = _zip_members(uploads[0].data, b)
            manifest = members.pop(MANIFEST, None)
            sources = [Upload(k, v) for k, v in members.items()]
        if len(sources) > b.max_files:
            raise DatasetRejected("files", f"{len(sources)} images uploaded, more than the {b.max_files} allowed")
        images: dict[str, _Image] = {}
        for i, up in enumerate(sources):
            if up.name in images:
                raise DatasetRejected("files", f"two files are named {_display(up.name)}")
            ext = check_image(up.name, up.data, b, "files")
            images[up.name] = _Image(up.name, _stored_name(i, up.name, ext), up.data)
        if not images:
            raise DatasetRejected("files", "the upload holds no image")
        if manifest is not None:
            rows, origin = _manifest_rows(manifest, images), "manifest"
        else:
            given = _captions(captions, set(images), trigger)
            if class_word is None:
                raise DatasetRejected("class_word", "class_word is required (the class the concept belongs to, "
                                                    "e.g. 'dog'): the manifest's base and target prompts use it")
            rows = [_row(img, given.get(name), class_word) for name, img in images.items()]
            origin = "given" if given else "template"
        return self._write(principal, list(images.values()), rows, trigger, class_word, origin)

    def _write(self, principal: Principal, images: list[_Image], rows: list[dict], trigger: str | None,
               class_word: str | None, origin: str) -> DatasetInfo:
        root = self._root(principal)
        root.mkdir(parents=True, exist_ok=True)
        if len(self._ids(root)) >= self.bounds.max_datasets:
            raise TooManyDatasets(f"this owner holds {self.bounds.max_datasets} datasets, the most allowed; "
                                  "delete one first")
        dataset_id = secrets.token_hex(8)
        tmp = root / f".tmp-{dataset_id}"
        try:
            (tmp / "imgs").mkdir(parents=True)
            for img in images:
                atomic_write_bytes(tmp / img.stored, img.data)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_bytes(tmp / MANIFEST, buf.getvalue().encode())
            try:       # the same check a batch runs: the manifest trains as uploaded
                read_concept_manifest(tmp / MANIFEST, trigger or "sks", max_pixels=self.bounds.max_pixels)
            except ManifestError as exc:
                raise DatasetRejected("files", str(exc).replace(str(tmp), "<dataset>")) from None
            info = DatasetInfo(id=dataset_id, data=data_reference(principal, dataset_id), images=len(images),
                               bytes=sum(len(i.data) for i in images), trigger=trigger, class_word=class_word,
                               captions=origin, created=time.time())
            atomic_write_json(tmp / META, info.model_dump(exclude={"data"}))
            fsync_dir(tmp / "imgs")
            os.rename(tmp, root / dataset_id)
            fsync_dir(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return info

    @staticmethod
    def _ids(root: Path) -> list[str]:
        if not root.is_dir():
            return []
        return [p.name for p in root.iterdir() if DATASET_ID.fullmatch(p.name) and (p / META).is_file()]

    def _folder(self, principal: Principal, dataset_id: str) -> Path:
        folder = self._root(principal) / dataset_id
        if not DATASET_ID.fullmatch(dataset_id) or not (folder / META).is_file():
            raise UnknownDataset(f"no dataset {dataset_id!r} of yours")
        return folder

    def get(self, principal: Principal, dataset_id: str) -> DatasetInfo:
        """One of the principal's datasets (``UnknownDataset`` for another owner's)."""
        meta = json.loads((self._folder(principal, dataset_id) / META).read_text())
        return DatasetInfo(**meta, data=data_reference(principal, dataset_id))

    def list(self, principal: Principal) -> DatasetList:
        """The principal's own datasets, newest first."""
        found = [self.get(principal, i) for i in self._ids(self._root(principal))]
        return DatasetList(datasets=sorted(found, key=lambda d: -d.created))

    def delete(self, principal: Principal, dataset_id: str) -> DatasetDeleted:
        """Remove one of the principal's datasets: renamed away first (gone at once), then deleted."""
        folder = self._folder(principal, dataset_id)
        trash = folder.with_name(f".del-{dataset_id}-{secrets.token_hex(4)}")
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return DatasetDeleted(id=dataset_id)
