"""Writing the report folder without touching the user's files: the manifest of what it wrote.

The report folder may hold the user's own files: the report writes, replaces and removes only the
files it wrote itself, listed with their SHA-256 in ``.genexp-report.json`` (its manifest), and
refuses, before writing anything, to overwrite a file it did not write (or one changed since).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from genexp import atomic
from genexp.errors import GenexpError
from genexp.report.collect import as_dict, read_json

MANIFEST = ".genexp-report.json"  # in the report folder: the files the report wrote, with their SHA-256
OWNED_NAME = re.compile(
    r"index\.html|report\.md|images/(nfe_sweep|sweep_params|sweep_history)\.png|images/[^/\\]+_(samples|curves)\.png"
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def report_folder(out: Path) -> Path:
    """``out``, created if missing; refused in one line before any work when it cannot hold the report."""

    def refuse(problem: str, fix: str = "pass --out <a writable folder>") -> GenexpError:
        return GenexpError(f"--out={out}: {problem}; {fix}")

    if out.exists() and not out.is_dir():
        raise refuse("is a file, not a folder", "pass --out <a folder> (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise refuse(f"cannot create it ({err.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise refuse("the folder is read-only")
    return out


def owned_files(out: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of the files the last report in ``out`` wrote (its manifest)."""
    manifest = read_json(out / MANIFEST, "files there count as the user's") or {}
    files = as_dict(manifest.get("files"))
    # only names the report writes: a hand-made manifest cannot point it at other files
    return {str(k): str(v) for k, v in files.items() if OWNED_NAME.fullmatch(str(k))}


def _is_owned(path: Path, digest: str | None) -> bool:
    """Whether ``path`` is a file the report wrote and nobody changed since."""
    if digest is None or not path.is_file() or path.is_symlink():
        return False
    try:
        return _sha256(path.read_bytes()) == digest
    except OSError:
        return False


def check_overwrites(out: Path, files: dict[str, bytes], owned: dict[str, str]) -> None:
    """Refuse, before anything is written, to replace a file the report did not write (a user's
    photo in ``images/``, an ``index.html`` of their own) or one changed since it wrote it."""
    images = out / "images"
    if images.exists() and not images.is_dir():
        raise GenexpError(
            f"--out={out}: images is a file, and the report puts its images in an images/ folder; "
            "move it away or pass --out <another folder>"
        )
    for rel in files:
        path = out / rel
        if not (path.exists() or path.is_symlink()):
            continue
        if _is_owned(path, owned.get(rel)) or (path.is_file() and path.read_bytes() == files[rel]):
            continue
        raise GenexpError(
            f"--out={out}: {rel} exists and genexp report did not write it (or it was changed since), so it "
            "is not overwritten; move it away or pass --out <another folder>"
        )


def commit_files(out: Path, files: dict[str, bytes], owned: dict[str, str]) -> None:
    """Write ``files`` atomically, remove the report's own files of last time that it no longer
    writes (runs gone from the folder), then the manifest; a failed write is one line."""
    rel = MANIFEST
    try:
        for rel, data in files.items():
            atomic.write_bytes(out / rel, data)
        for rel, digest in owned.items():
            if rel not in files and _is_owned(out / rel, digest):
                (out / rel).unlink()
        rel = MANIFEST
        manifest = {"written_by": "genexp report", "files": {k: _sha256(v) for k, v in files.items()}}
        atomic.write_json(out / MANIFEST, manifest)
    except OSError as err:
        fix = "free space there or pass --out <another folder>"
        if not atomic.is_full(err):
            fix = "pass --out <a writable folder>"
        raise GenexpError(
            f"--out={out}: cannot write {rel} ({err.strerror or type(err).__name__}); {fix}"
        ) from None
