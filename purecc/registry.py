"""The adapter registry: immutable, versioned concepts under ``<root>/adapters/<concept_id>/``.

``root`` is a local folder or any URI ``pyarrow.fs`` understands (``s3://bucket/prefix?...``).

    adapters/<id>/<version>/...        one publication, written completely, never changed or moved
    adapters/<id>/current.json         {version, owner, published, previous}: written last

A version is the content hash of its files, so publishing the same files twice is the same version.
Publishing writes every file of the new version, the manifest last, and only then replaces the
pointer: atomically on a local folder (temp file + rename), and on object storage by one PUT,
which is atomic there. Readers therefore see the old version until the pointer flips and the new
one after, never a gap, and nothing is ever moved (pyarrow's S3 file system cannot move folders).
Older versions stay, so a reader holding one keeps reading it.

``fetch`` copies one version into ``<cache>/<id>/<version>/``: it downloads into a temporary
name and renames it into place; a version already there is used as is (versions never change),
so no folder another thread reads is ever removed or renamed. A local registry is read in place.

Nothing read is trusted (``purecc.adapter_files`` checks manifests, names, sizes, symlinks,
hashes and tensors): a bad entry is reported by ``scan()`` with its reason and left out of
``list()``, and never breaks the listing.

The old flat layout (``adapters/<id>/purecc_adapter.json`` and its files directly) is still read,
as version ``flat-<hash of its manifest>``; the first publish of such a concept writes the new
layout beside it, and its pointer takes over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from .adapter_files import (FILE_NAME_PATTERN, MANIFEST, MAX_JSON_FILE_BYTES,
                            MAX_MANIFEST_BYTES, POINTER, VERSION_PATTERN, AdapterFileError, AdapterManifest,
                            FileMissing, FileTooLarge, HashMismatch, ManifestMissing, RegistryPointer,
                            UnsafeFile, check_publishable, parse_manifest, parse_pointer, parse_weights,
                            read_listed_files, read_regular_file, size_limit)
from .fileio import atomic_write_bytes, sha256_bytes
from .ids import CONCEPT_ID_PATTERN, validate_concept_id

log = logging.getLogger(__name__)

FLAT_PREFIX = "flat-"
POINTER_READS = 3           # reads of a pointer before it counts as bad (see _pointer)
POINTER_RETRY_S = 0.05
MAX_VERSION_FILES = 1024
MAX_VERSION_BYTES = 4 << 30
MAX_FILE_BYTES = 2 << 30
_VERSION = re.compile(VERSION_PATTERN)
_FLAT = re.compile(r"^flat-[0-9a-f]{32}$")
_NAME = re.compile(FILE_NAME_PATTERN)
_CONCEPT = re.compile(CONCEPT_ID_PATTERN)
# the validation images a stage rendered, published with the adapter: validation/stage<n>/<NN>.png
VALIDATION_DIR = "validation"
VALIDATION_PROMPTS = "prompts.json"
_VALIDATION_PNG = re.compile(r"^[0-9]{2}\.png$")
MAX_VALIDATION_IMAGES = 32        # per stage listed
MAX_VALIDATION_PNG_BYTES = 16 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class NotOwner(PermissionError):
    """A publish of a concept that another owner holds."""

    def __init__(self, concept_id: str, owner: str | None):
        super().__init__(concept_id, owner)
        self.concept_id, self.owner = concept_id, owner

    def __str__(self) -> str:
        return f"concept {self.concept_id!r} is owned by another owner; only its owner may replace it"


class UnknownVersion(KeyError):
    """A version the registry does not hold for this concept."""

    def __str__(self) -> str:
        return f"concept {self.args[0]!r} has no version {self.args[1]!r}"


@dataclass(frozen=True)
class RegistryEntry:
    """One concept folder as ``scan()`` found it: servable (a manifest) or not (a reason)."""

    concept_id: str
    version: str | None = None
    manifest: AdapterManifest | None = None
    owner: str | None = None
    reason: str | None = None

    @property
    def servable(self) -> bool:
        """Whether the entry can be served (its reason is None)."""
        return self.reason is None


def resolve_fs(root: str) -> tuple[pafs.FileSystem, str]:
    """The file system and base path for ``root``: a local folder (made absolute) or a pyarrow.fs URI."""
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    local = Path(root).expanduser().resolve()
    return pafs.LocalFileSystem(), str(local)


def content_version(files: dict[str, bytes]) -> str:
    """The version of a publication: a hash of its file names and contents (32 hex digits)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{sha256_bytes(files[rel])}\n".encode())
    return h.hexdigest()[:32]


def _safe_rel(rel: str) -> bool:
    """A relative path made of plain names only (no '', '.', '..', leading dots, backslashes)."""
    parts = rel.split("/")
    return 0 < len(parts) <= 4 and all(_NAME.fullmatch(p) for p in parts)


def local_files(folder: Path, label: str) -> dict[str, bytes]:
    """Every file under a local folder to publish, read once: regular files only, plain names, bounded."""
    out, total = {}, 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise UnsafeFile(f"{label}: {name} is a symlink; published folders hold regular files only")
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if not _safe_rel(rel):
                raise UnsafeFile(f"{label}: {rel[:120]!r} is not a plain file name ({FILE_NAME_PATTERN})")
            out[rel] = read_regular_file(path, MAX_FILE_BYTES, label=label, name=rel)
            total += len(out[rel])
            if len(out) > MAX_VERSION_FILES or total > MAX_VERSION_BYTES:
                raise FileTooLarge(f"{label}: more than {MAX_VERSION_FILES} files or {MAX_VERSION_BYTES} bytes")
    return out


class AdapterRegistry:
    """Published adapters under ``<root>/adapters/<concept_id>/`` on a local or pyarrow.fs file system."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.fs, self.base = resolve_fs(self.root)
        self.adapters = f"{self.base}/adapters"  # created by the first publish; reading never writes

    @property
    def is_local(self) -> bool:
        """Whether the registry is on the local file system (its folders can be read in place)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    # ----- paths ---------------------------------------------------------------------------------
    def concept_path(self, concept_id: str) -> str:
        """The registry folder of ``concept_id`` (the id is validated first): its versions and pointer."""
        return f"{self.adapters}/{validate_concept_id(concept_id)}"

    def path_of(self, concept_id: str) -> str:
        """The folder holding the current version's files (the concept folder when not published)."""
        try:
            return self._resolve(concept_id)[1]
        except (KeyError, AdapterFileError):
            return self.concept_path(concept_id)

    def _version_path(self, concept_id: str, version: str) -> str:
        if _FLAT.fullmatch(version):
            if self._resolve(concept_id)[0] != version:
                raise UnknownVersion(concept_id, version)
            return self.concept_path(concept_id)
        if not _VERSION.fullmatch(version):
            raise UnknownVersion(concept_id, version[:64])
        return f"{self.concept_path(concept_id)}/{version}"

    # ----- reading, trusting nothing ---------------------------------------------------------------
    def _stat(self, path: str) -> tuple[pafs.FileType, int | None]:
        """(type, size) of a path; locally by lstat, so a symlink is reported as Unknown, never followed."""
        if not self.is_local:
            info = self.fs.get_file_info(path)
            return info.type, info.size
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return pafs.FileType.NotFound, None
        if stat.S_ISDIR(st.st_mode):
            return pafs.FileType.Directory, None
        if stat.S_ISREG(st.st_mode):
            return pafs.FileType.File, st.st_size
        return pafs.FileType.Unknown, None

    def _type(self, path: str) -> pafs.FileType:
        return self._stat(path)[0]

    def _read(self, path: str, limit: int, *, label: str, name: str) -> bytes:
        """A file's bytes, at most ``limit``: no symlinks locally, no oversized objects remotely."""
        if self.is_local:
            return read_regular_file(Path(path), limit, label=label, name=name)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileMissing(f"{label}: file {name} is missing")
        if info.type != pafs.FileType.File:
            raise UnsafeFile(f"{label}: {name} is not a file")
        if info.size is not None and info.size > limit:
            raise FileTooLarge(f"{label}: {name} is {info.size} bytes, larger than {limit}")
        with self.fs.open_input_stream(path) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise FileTooLarge(f"{label}: {name} is larger than {limit} bytes")
        return data

    def _pointer(self, concept_id: str) -> RegistryPointer | None:
        """The concept's pointer, None when it has none (``AdapterFileError`` when it is bad)."""
        path = f"{self.concept_path(concept_id)}/{POINTER}"
        kind = self._type(path)
        if kind == pafs.FileType.NotFound:
            return None
        label = f"concept {concept_id}"

        def read() -> RegistryPointer:
            return parse_pointer(self._read(path, MAX_JSON_FILE_BYTES, label=label, name=POINTER), label=label,
                                 expected_id=concept_id)

        for attempt in range(1, POINTER_READS):
            try:
                return read()
            except (AdapterFileError, OSError):
                # S3 replaces an object atomically, but some S3-compatible servers (moto's, seen in
                # test_registry_s3 under load: it disposes of the old body before the new one is served)
                # give a read racing a pointer flip a broken body once; a pointer still bad after a few
                # reads is reported as bad.
                time.sleep(POINTER_RETRY_S * attempt)
        return read()

    def _resolve(self, concept_id: str) -> tuple[str, str, RegistryPointer | None]:
        """(version, folder of its files, pointer) of the current version; KeyError when not published."""
        concept = self.concept_path(concept_id)
        label = f"concept {concept_id}"
        kind = self._type(concept)
        if kind == pafs.FileType.NotFound:
            raise KeyError(concept_id)
        if kind != pafs.FileType.Directory:
            raise UnsafeFile(f"{label}: its registry entry is not a folder (a symlink or a file)")
        ptr = self._pointer(concept_id)
        if ptr is not None:
            folder = f"{concept}/{ptr.version}"
            if self._type(folder) != pafs.FileType.Directory:
                raise FileMissing(f"{label}: its current version {ptr.version} is missing or not a folder")
            return ptr.version, folder, ptr
        manifest = f"{concept}/{MANIFEST}"
        if self._type(manifest) == pafs.FileType.NotFound:
            raise KeyError(concept_id)                 # a folder without a publication (yet)
        data = self._read(manifest, MAX_MANIFEST_BYTES, label=label, name=MANIFEST)
        return FLAT_PREFIX + sha256_bytes(data)[:32], concept, None

    def _manifest_at(self, concept_id: str, folder: str) -> AdapterManifest:
        """The validated manifest in a version folder, its listed files present, regular and bounded."""
        label = f"concept {concept_id}"
        path = f"{folder}/{MANIFEST}"
        if self._type(path) == pafs.FileType.NotFound:
            raise ManifestMissing(f"{label}: no {MANIFEST} in its version folder")
        manifest = parse_manifest(self._read(path, MAX_MANIFEST_BYTES, label=label, name=MANIFEST), label=label,
                                  expected_id=concept_id)
        for name in manifest.files:
            kind, size = self._stat(f"{folder}/{name}")
            if kind == pafs.FileType.NotFound:
                raise FileMissing(f"{label}: file {name} is missing")
            if kind != pafs.FileType.File:
                raise UnsafeFile(f"{label}: {name} is not a regular file (a symlink or a folder)")
            if size is not None and size > size_limit(name):
                raise FileTooLarge(f"{label}: {name} is {size} bytes, larger than {size_limit(name)}")
        return manifest

    def current(self, concept_id: str) -> tuple[str, AdapterManifest]:
        """(version, manifest) the registry serves now; KeyError when not published, else
        ``AdapterFileError`` naming why it cannot be served."""
        version, folder, _ = self._resolve(concept_id)
        return version, self._manifest_at(concept_id, folder)

    def manifest(self, concept_id: str) -> AdapterManifest | None:
        """The current manifest of ``concept_id``, None when not published (``AdapterFileError`` when bad)."""
        try:
            return self.current(concept_id)[1]
        except KeyError:
            return None

    def owner(self, concept_id: str) -> str | None:
        """The owner recorded for ``concept_id`` (None: not published, unowned, or the flat layout)."""
        ptr = self._pointer(concept_id) if self._type(self.concept_path(concept_id)) == pafs.FileType.Directory \
            else None
        return ptr.owner if ptr is not None else None

    def versions(self, concept_id: str) -> list[str]:
        """The versions published for ``concept_id`` (folders named like a version), sorted."""
        sel = pafs.FileSelector(self.concept_path(concept_id), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.Directory and _VERSION.fullmatch(i.base_name))

    def version_manifest(self, concept_id: str, version: str) -> AdapterManifest:
        """The validated manifest of one version (``UnknownVersion`` when the registry has no such version)."""
        folder = self._version_path(concept_id, version)
        if self._type(folder) != pafs.FileType.Directory:
            raise UnknownVersion(concept_id, version)
        return self._manifest_at(concept_id, folder)

    def find_version(self, concept_id: str, served_version: str) -> tuple[str, AdapterManifest] | None:
        """The version whose ``AdapterManifest.served_version`` is this (the current one first), or None."""
        try:
            version, manifest = self.current(concept_id)
            if manifest.served_version == served_version:
                return version, manifest
        except (KeyError, AdapterFileError):
            version = None
        for v in reversed(self.versions(concept_id)):
            if v == version:
                continue
            try:
                m = self.version_manifest(concept_id, v)
            except (KeyError, AdapterFileError):
                continue
            if m.served_version == served_version:
                return v, m
        return None

    def scan(self, *, verify: bool = False) -> list[RegistryEntry]:
        """Every concept folder, servable or not (with its reason), sorted by id; never raises for one
        bad entry. ``verify``: also hash and check every listed file (reads the weights)."""
        sel = pafs.FileSelector(self.adapters, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            name = info.base_name
            if name.startswith("."):
                continue
            if not _CONCEPT.fullmatch(name):
                out.append(RegistryEntry(name[:80], reason="not a valid concept id"))
                continue
            out.append(self._entry(name, verify))
        return sorted(out, key=lambda e: e.concept_id)

    def _entry(self, concept_id: str, verify: bool) -> RegistryEntry:
        version = owner = None
        try:
            version, folder, ptr = self._resolve(concept_id)
            owner = ptr.owner if ptr else None
            manifest = self._manifest_at(concept_id, folder)
            if verify:
                self._verify(concept_id, version, folder, manifest)
            return RegistryEntry(concept_id, version, manifest, owner)
        except KeyError:
            return RegistryEntry(concept_id, reason="no published version")
        except AdapterFileError as exc:
            return RegistryEntry(concept_id, version, None, owner, reason=str(exc))
        except OSError as exc:
            return RegistryEntry(concept_id, version, None, owner, reason=f"unreadable ({type(exc).__name__})")

    def verify(self, concept_id: str, version: str) -> AdapterManifest:
        """Fully check one version (manifest, every file's size and sha256, safetensors layout, finite
        weights; reads the weights) and return its manifest; ``AdapterFileError`` names what is wrong."""
        folder = self._version_path(concept_id, version)
        if self._type(folder) != pafs.FileType.Directory:
            raise UnknownVersion(concept_id, version)
        manifest = self._manifest_at(concept_id, folder)
        self._verify(concept_id, version, folder, manifest)
        return manifest

    def _verify(self, concept_id: str, version: str, folder: str, manifest: AdapterManifest) -> None:
        label = f"concept {concept_id}"
        if self.is_local:
            files = read_listed_files(Path(folder), manifest, label=label)
        else:
            files = {}
            for name, digest in manifest.files.items():
                files[name] = self._read(f"{folder}/{name}", size_limit(name), label=label, name=name)
                if sha256_bytes(files[name]) != digest:
                    raise HashMismatch(f"{label}: sha256 of {name} does not match its manifest")
        for name, data in files.items():
            if name.endswith(".safetensors"):
                parse_weights(data, label=label, name=name)

    # ----- validation images -----------------------------------------------------------------------
    def _validation_folder(self, concept_id: str, stage: int) -> str | None:
        """The current version's ``validation/stage<n>`` folder; None when it has none (or it is not a
        plain folder: a symlink is never followed)."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        folder = self._resolve(concept_id)[1]
        for sub in (f"{folder}/{VALIDATION_DIR}", f"{folder}/{VALIDATION_DIR}/stage{stage}"):
            if self._type(sub) != pafs.FileType.Directory:
                return None
        return f"{folder}/{VALIDATION_DIR}/stage{stage}"

    def validation_images(self, concept_id: str) -> dict[int, list[tuple[str, str | None]]]:
        """The current version's validation images: stage -> [(file name, prompt or None)], sorted by name
        (at most ``MAX_VALIDATION_IMAGES`` per stage). KeyError when the concept is not published."""
        out: dict[int, list[tuple[str, str | None]]] = {}
        label = f"concept {concept_id}"
        for stage in (1, 2):
            folder = self._validation_folder(concept_id, stage)
            if folder is None:
                continue
            infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            names = sorted(i.base_name for i in infos if _VALIDATION_PNG.fullmatch(i.base_name)
                           and self._type(i.path) == pafs.FileType.File)[:MAX_VALIDATION_IMAGES]
            prompts: list = []
            if self._type(f"{folder}/{VALIDATION_PROMPTS}") == pafs.FileType.File:
                try:
                    data = json.loads(self._read(f"{folder}/{VALIDATION_PROMPTS}", MAX_JSON_FILE_BYTES,
                                                 label=label, name=VALIDATION_PROMPTS))
                    prompts = data.get("prompts", []) if isinstance(data, dict) else []
                except (AdapterFileError, OSError, ValueError):
                    prompts = []             # the images are still worth showing without their prompts
            if names:
                out[stage] = [(n, prompts[int(n[:2])] if int(n[:2]) < len(prompts)
                               and isinstance(prompts[int(n[:2])], str) else None) for n in names]
        return out

    def validation_image(self, concept_id: str, stage: int, name: str) -> bytes:
        """The bytes of one validation PNG of the current version (``FileMissing`` when there is no such
        image; ``UnsafeFile`` for a name that is not ``NN.png`` or bytes that are not a PNG)."""
        label = f"concept {concept_id}"
        if not _VALIDATION_PNG.fullmatch(name):
            raise UnsafeFile(f"{label}: {name[:40]!r} is not a validation image name (NN.png)")
        folder = self._validation_folder(concept_id, stage)
        if folder is None:
            raise FileMissing(f"{label}: no stage-{stage} validation images")
        data = self._read(f"{folder}/{name}", MAX_VALIDATION_PNG_BYTES, label=label,
                          name=f"{VALIDATION_DIR}/stage{stage}/{name}")
        if not data.startswith(PNG_MAGIC):
            raise UnsafeFile(f"{label}: {VALIDATION_DIR}/stage{stage}/{name} is not a PNG")
        return data

    def list(self) -> list[AdapterManifest]:
        """Manifests of every servable concept, sorted by id; bad entries are logged and left out."""
        out = []
        for entry in self.scan():
            if entry.servable:
                out.append(entry.manifest)
            elif entry.reason != "no published version":
                log.warning("registry: concept %s cannot be served: %s", entry.concept_id, entry.reason)
        return out

    # ----- publishing ------------------------------------------------------------------------------
    def publish(self, concept_id: str, folder: str | Path, owner: str | None = None) -> str:
        """Publish a local adapter folder (and its subfolders) as a new version of ``concept_id``.

        The folder is checked first (manifest naming ``concept_id``, hashes, safetensors, finite
        weights). ``owner``: refused with ``NotOwner`` when the concept is recorded with another
        owner; None keeps the recorded owner (for trusted internal callers). Returns the version's
        folder.
        """
        cid = validate_concept_id(concept_id)
        folder = Path(folder)
        label = f"publish {cid}"
        if not (folder / MANIFEST).is_file():
            raise ManifestMissing(f"{label}: the folder has no {MANIFEST}")
        files = local_files(folder, label)
        check_publishable(files, cid)              # the very bytes that are uploaded
        version = content_version(files)
        try:
            previous = self._pointer(cid) if self._type(self.concept_path(cid)) == pafs.FileType.Directory \
                else None
        except AdapterFileError as exc:   # a damaged pointer is replaced; its owner is unknown
            log.warning("registry: %s: replacing an unreadable pointer: %s", cid, exc)
            previous = None
        if owner is not None and previous is not None and previous.owner not in (None, owner):
            raise NotOwner(cid, previous.owner)
        target = f"{self.concept_path(cid)}/{version}"
        for rel in sorted(files, key=lambda r: r == MANIFEST):       # the version's manifest last
            self._write(f"{target}/{rel}", files[rel])
        pointer = RegistryPointer(concept_id=cid, version=version, owner=owner or (previous and previous.owner),
                                  published=time.time(), previous=previous.version if previous else None)
        self._write(f"{self.concept_path(cid)}/{POINTER}", pointer.model_dump_json(indent=2).encode())
        return target

    def _write(self, path: str, data: bytes) -> None:
        """Write one file whole: temp + rename locally, one object PUT on object storage."""
        if self.is_local:
            atomic_write_bytes(path, data)
            return
        if not isinstance(self.fs, pafs.S3FileSystem):    # object stores have no folders to make
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    # ----- fetching --------------------------------------------------------------------------------
    def fetch(self, concept_id: str, cache_dir: str | Path, version: str | None = None) -> Path:
        """A local folder holding one version's files (the current one by default).

        Local registries are read in place. Otherwise the version is copied once into
        ``<cache_dir>/<id>/<version>/`` (downloaded under a temporary name, renamed into place;
        an existing copy is reused, never replaced). KeyError when not published.
        """
        if version is None:
            version, src, _ = self._resolve(concept_id)
        else:
            src = self._version_path(concept_id, version)
            if self._type(src) != pafs.FileType.Directory:
                raise UnknownVersion(concept_id, version)
        if self._type(f"{src}/{MANIFEST}") == pafs.FileType.NotFound:
            raise KeyError(concept_id)
        if self.is_local:
            return Path(src)
        dest = Path(cache_dir) / concept_id / version
        if (dest / MANIFEST).is_file():
            return dest
        files = self._remote_files(concept_id, src, flat=version.startswith(FLAT_PREFIX))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{version}.{uuid.uuid4().hex[:8]}"
        try:
            for rel, path in sorted(files.items(), key=lambda kv: kv[0] == MANIFEST):
                data = self._read(path, MAX_FILE_BYTES, label=f"concept {concept_id}", name=rel)
                atomic_write_bytes(tmp / rel, data)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / MANIFEST).is_file():   # not another reader's finished copy: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _remote_files(self, concept_id: str, src: str, *, flat: bool) -> dict[str, str]:
        """{relative name: path} of a version's files, every name plain, bounded in count and size."""
        label = f"concept {concept_id}"
        out, total = {}, 0
        for info in self.fs.get_file_info(pafs.FileSelector(src, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(src) + 1:]
            first = rel.split("/", 1)[0]
            if flat and (first == POINTER or _VERSION.fullmatch(first)):
                continue                      # the new layout's files beside an old flat concept
            if not _safe_rel(rel):
                raise UnsafeFile(f"{label}: {rel[:120]!r} is not a plain file name")
            out[rel] = info.path
            total += info.size or 0
            if len(out) > MAX_VERSION_FILES or total > MAX_VERSION_BYTES:
                raise FileTooLarge(f"{label}: more than {MAX_VERSION_FILES} files or {MAX_VERSION_BYTES} bytes")
        return out
