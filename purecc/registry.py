"""The adapter registry: published concepts under ``<root>/adapters/<concept_id>/``.

``root`` is a local folder or any URI ``pyarrow.fs`` understands (``s3://bucket/prefix``,
``gs://...``). Publishing uploads into a staging folder, then moves it into place; the adapter's
manifest (``purecc_adapter.json``) is the last file written, so a reader never sees a half-published
concept, and every weight file is checked against its sha256 when it is loaded.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from .adapter_files import MANIFEST, AdapterFileError, AdapterManifest
from .ids import validate_concept_id


def resolve_fs(root: str) -> tuple[pafs.FileSystem, str]:
    """The file system and base path for ``root``: a local folder (made absolute) or a pyarrow.fs URI."""
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/")
    local = Path(root).expanduser().resolve()
    return pafs.LocalFileSystem(), str(local)


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

    def path_of(self, concept_id: str) -> str:
        """The registry folder of ``concept_id`` (the id is validated first)."""
        return f"{self.adapters}/{validate_concept_id(concept_id)}"

    def publish(self, concept_id: str, folder: str | Path) -> str:
        """Upload a local adapter folder (and its subfolders) as ``concept_id``; replaces an older one."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise AdapterFileError(f"publish {concept_id}: {folder} has no {MANIFEST}")
        self.fs.create_dir(self.adapters, recursive=True)
        staging = f"{self.adapters}/.staging-{concept_id}-{uuid.uuid4().hex[:8]}"
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
        for p in files + [folder / MANIFEST]:  # manifest last
            rel = p.relative_to(folder).as_posix()
            self.fs.create_dir(f"{staging}/{rel}".rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(f"{staging}/{rel}") as out:
                out.write(p.read_bytes())
        target = self.path_of(concept_id)
        if self.fs.get_file_info(target).type != pafs.FileType.NotFound:
            trash = f"{self.adapters}/.trash-{concept_id}-{uuid.uuid4().hex[:8]}"
            self.fs.move(target, trash)
            self.fs.move(staging, target)
            self.fs.delete_dir(trash)
        else:
            self.fs.move(staging, target)
        return target

    def manifest(self, concept_id: str) -> AdapterManifest | None:
        """The published manifest of ``concept_id``, or None when it is not published."""
        path = f"{self.path_of(concept_id)}/{MANIFEST}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return AdapterManifest.from_json(json.loads(f.read()))

    def list(self) -> list[AdapterManifest]:
        """Manifests of every published concept, sorted by id."""
        sel = pafs.FileSelector(self.adapters, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            name = info.base_name
            if info.type == pafs.FileType.Directory and not name.startswith("."):
                m = self.manifest(name)
                if m is not None:
                    out.append(m)
        return sorted(out, key=lambda m: m.concept_id)

    def fetch(self, concept_id: str, cache_dir: str | Path) -> Path:
        """A local folder holding the concept's files (the registry folder itself when local)."""
        src = self.path_of(concept_id)
        if self.fs.get_file_info(f"{src}/{MANIFEST}").type != pafs.FileType.File:
            raise KeyError(concept_id)
        if self.is_local:
            return Path(src)
        dest = Path(cache_dir) / concept_id
        tmp = dest.with_name(f".{concept_id}.{uuid.uuid4().hex[:8]}")
        for info in self.fs.get_file_info(pafs.FileSelector(src, recursive=True)):
            if info.type == pafs.FileType.File:
                rel = info.path[len(src) + 1:]
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(info.path) as f:
                    (tmp / rel).write_bytes(f.read())
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        return dest
