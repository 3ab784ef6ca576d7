"""Durable file writes: what an atomic save (write beside, fsync, rename) needs on disk
before the rename makes it visible (moekit.checkpoint, train/rundir.py, traces/format.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush a written file's contents to disk."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def write_text_synced(path: Path, text: str) -> None:
    """Write UTF-8 text and flush it to disk before returning."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def replace_folder(tmp: Path, final: Path, prev: Path) -> None:
    """Make the written folder tmp the folder final by renames: an existing final moves to
    prev first and prev is removed last, so a crash leaves final or prev whole."""
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)
    shutil.rmtree(prev, ignore_errors=True)
