"""Atomic result files: written to a temporary name in the same folder, then renamed, so a killed run never leaves
a half-written file that a later run would trust."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` only if it succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def atomic_folder(path, write: Callable[[Path], None], marker: str) -> Path:
    """`atomic_write` for a folder (a checkpoint): ``write(tmp_folder)`` on a temporary sibling, renamed to ``path``
    only if it succeeded, so a killed run never leaves a half-written folder there.

    ``path`` must be new, empty, or an earlier such folder (it holds ``marker``), which is replaced whole: a folder
    of other files (a results folder, the working directory) is refused rather than wiped. If the final rename
    fails the earlier folder is put back; a process killed between the two renames leaves no folder at ``path``
    (the earlier one waits in a hidden ``.old`` sibling), never a mixed one."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / marker).is_file():
        raise ValueError(f"{path} holds other files and no {marker}: give a new or empty folder for the checkpoint")
    if path.exists() and path.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ValueError(f"{path} is the working directory or holds it: give another folder for the checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the checkpoint private to its writer
    old = tmp.with_suffix(".old")
    try:
        write(tmp)
        if path.exists():
            path.rename(old)
            try:
                os.replace(tmp, path)
            except OSError:
                old.rename(path)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def digest(value) -> str:
    """A stable hash (hex) of a JSON-able value: names a result by everything it depends on."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def write_table(frame: pd.DataFrame, path) -> Path:
    """Atomically write a DataFrame as parquet (``.parquet``) or CSV (``.csv``)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    if path.suffix == ".csv":
        return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    raise ValueError(f"unsupported table format {path.suffix!r}: use .parquet or .csv")


def read_table(path) -> pd.DataFrame:
    path = Path(path)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def write_text(text: str, path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
