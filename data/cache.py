"""Prepared datasets kept on disk by fingerprint, shared by phase 1 and phase 2.

Design decisions:
- The key hashes the pipeline version, the data settings, the seed, each local input file (path, size,
  mtime) and the tokenizer files: any change prepares anew, the same settings start at once.
- A prepared dataset and its report (`stats.json`) are written to a temporary folder and renamed into
  place, so an interrupted preparation leaves nothing half-written and a reader never sees a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from datasets import DatasetDict, load_from_disk

from data.tokenizer import FILE_SHA256


def fingerprint(version: int, settings: dict, paths: list[str], seed: int) -> str:
    files = []
    for path in paths:
        stat = Path(path).stat() if Path(path).exists() else None
        files.append([str(Path(path).resolve()), stat and stat.st_size, stat and stat.st_mtime_ns])
    payload = json.dumps([version, settings, seed, files, FILE_SHA256], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_prepared(cache_path: Path) -> tuple[DatasetDict, dict] | None:
    """A prepared dataset and its report, or None when there is none at `cache_path`."""
    if not (cache_path / "stats.json").is_file():
        return None
    stats = json.loads((cache_path / "stats.json").read_text())
    return load_from_disk(str(cache_path / "dataset")), stats


def save_prepared(splits: DatasetDict, stats: dict, cache_path: Path) -> DatasetDict:
    """Write atomically; returns the dataset as loaded back from disk (memory-mapped)."""
    tmp_path = cache_path.parent / f".tmp-{cache_path.name}-{os.getpid()}"
    shutil.rmtree(tmp_path, ignore_errors=True)
    splits.save_to_disk(str(tmp_path / "dataset"))
    (tmp_path / "stats.json").write_text(json.dumps(stats, indent=2))
    shutil.rmtree(cache_path, ignore_errors=True)
    os.replace(tmp_path, cache_path)
    return load_from_disk(str(cache_path / "dataset"))
