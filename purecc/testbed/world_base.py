"""Where the committed world base lives, and its checksums (no pretraining code imported).

``assets/world-base`` is a diffusers SD3 folder written by ``python -m purecc.testbed.pretrain``;
its ``CHECKSUMS.sha256`` (``sha256sum -c`` format, paths relative to the folder) lists every
other file.
"""

from __future__ import annotations

from pathlib import Path

from ..fileio import sha256_file

CHECKSUMS = "CHECKSUMS.sha256"
PACKAGED_WORLD_BASE = Path(__file__).resolve().parent / "assets" / "world-base"


def world_base_path() -> Path:
    """The packaged, pretrained world base (a diffusers SD3 folder)."""
    return PACKAGED_WORLD_BASE


def write_checksums(folder: str | Path) -> Path:
    """Write ``CHECKSUMS.sha256`` listing every other file of ``folder`` (sorted, posix paths)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    out = folder / CHECKSUMS
    out.write_text("".join(lines))
    return out


def verify_world_base(path: str | Path | None = None) -> list[str]:
    """Check ``path`` (default: the packaged base) against its ``CHECKSUMS.sha256``.

    Returns the listed files; raises ``ValueError`` naming every file that is missing, differs,
    or is present but unlisted.
    """
    folder = Path(path) if path is not None else world_base_path()
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise ValueError(f"world base: {folder} has no {CHECKSUMS}")
    expected = {}
    for line in listing.read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    problems = []
    for name, digest in sorted(expected.items()):
        f = folder / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{name}: sha256 differs from {CHECKSUMS}")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and p.name != CHECKSUMS}
    problems += [f"{name}: not listed in {CHECKSUMS}" for name in sorted(present - set(expected))]
    if problems:
        raise ValueError(f"world base {folder}: " + "; ".join(problems))
    return sorted(expected)
