"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every output of every stage goes through here, so an interrupted job never leaves a file that a
rerun would mistake for finished work.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide shared cluster data from the group
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success its files are fsynced and it is renamed to `path` in one
    step. An existing `path` is kept (another process published the same content first) unless `replace`, when it
    is swapped out (and back, should the swap fail)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = staging.with_name(staging.name + ".old")
    try:
        yield staging
        for file in staging.iterdir():
            with open(file, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp's 0700 would hide shared cluster data from the group
        if replace and path.exists():
            os.rename(path, old)
        try:
            os.rename(staging, path)
        except OSError:
            if old.exists():  # the swap failed: the old one back
                os.rename(old, path)
                raise
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
