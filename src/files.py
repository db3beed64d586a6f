"""Writing files and folders so that a reader, or a failure halfway, never sees half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced(path: Path, folder: bool = False):
    """Yield a temporary path beside `path` (a file, or a new folder) to write. If the block succeeds, it
    replaces `path` in one rename; if it fails, it is deleted and `path` is left as it was. Beside, because a
    rename is atomic only within one file system."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    target = staging / path.name
    if folder:
        target.mkdir()
    try:
        yield target
        if folder and path.exists():  # a folder cannot be renamed over another: move the old one aside first
            os.replace(path, staging / "previous")
        os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
