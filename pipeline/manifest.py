"""Manifests: the record each stage writes last, and the hashes that identify work."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FAILURE = "failure.json"

# Library versions recorded in every manifest (those installed; absent ones are skipped).
TRACKED_PACKAGES = (
    "torch",
    "numpy",
    "megatron-core",
    "nemo-curator",
    "nemo-run",
    "ray",
    "tokenizers",
    "transformers",
    "peft",
    "trl",
    "nvidia-pytriton",
    "tritonclient",
)


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_output(path: Path, root: Path) -> dict[str, Any]:
    """Return {path, sha256, bytes, files} for a file or a directory tree under root.

    A directory's sha256 hashes the sorted (relative path, file sha256) pairs.
    """
    rel = str(path.relative_to(root))
    if path.is_file():
        return {"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size, "files": 1}
    if not path.is_dir():
        raise FileNotFoundError(f"stage output {rel!r} was not written")
    h = hashlib.sha256()
    size = count = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode() + b"\n")
        size += f.stat().st_size
        count += 1
    return {"path": rel, "sha256": h.hexdigest(), "bytes": size, "files": count}


def code_hash(paths: tuple[str, ...], repo_root: Path) -> str:
    """Return a hash of the files (sources and package data) under the given repo-relative paths."""
    h = hashlib.sha256()
    for rel in sorted(paths):
        target = repo_root / rel
        files = [target] if target.is_file() else sorted(
            f for f in target.rglob("*") if f.is_file() and "__pycache__" not in f.parts
        )
        for f in files:
            h.update(str(f.relative_to(repo_root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def external_files_stamp(paths: list[str]) -> list[list]:
    """Return [path, bytes, mtime_ns] for every file under `paths` (files or directories)."""
    stamps = []
    for p in paths:
        root = Path(p)
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            stamps.append([str(f), st.st_size, st.st_mtime_ns])
    return stamps


def fingerprint(payload: dict) -> str:
    """Return the short sha256 of a JSON-serialisable payload (sorted keys)."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Return python and the tracked library versions installed here."""
    versions = {"python": sys.version.split()[0]}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to `path` via a temp file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(stage_dir: Path) -> dict | None:
    """Return the manifest in `stage_dir`, or None where there is none."""
    path = stage_dir / MANIFEST
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)
