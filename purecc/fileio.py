"""Atomic, hashed file writes: temp file in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save as st_save


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its ``__metadata__`` keys in sorted order.

    safetensors (0.8) writes the metadata map in a random per-call order (its upstream issue #584),
    so two saves of the same tensors and metadata differ in bytes, and every content hash built
    on them (a file's sha256 in a manifest, a registry version) would differ too. Only the header
    is rewritten: the tensor entries keep their order and offsets (relative to the data after the
    header), the header is padded with spaces to 8 bytes as the format asks, and the data is
    untouched. safetensors itself cannot be told to sort, hence these few lines.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors only: tensors are made contiguous CPU copies before serialising; the bytes are a
    function of the tensors and metadata alone (``canonical_safetensors``)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = st_save(flat, metadata=dict(metadata) if metadata else None)
    return atomic_write_bytes(path, canonical_safetensors(data) if metadata else data)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file into a dict of CPU tensors."""
    return load_file(str(path))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data`` (files read once into memory are hashed and parsed from the same bytes)."""
    return hashlib.sha256(data).hexdigest()
