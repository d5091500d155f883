"""Atomic file writes: the one temp-and-rename helper. Standard library only.

Several processes may write into one directory at once (two `crepe search` workers sharing a
study directory), and a reader must never see a half-written file. ``atomic_write`` writes into a
sibling with a name no other writer uses (process id and a random token), then renames it onto
the target; on any error the sibling is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write"]


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``content`` to ``path`` atomically and return ``path``.

    ``content``: text, bytes, or ``write(tmp)`` that writes the file (or a directory) at ``tmp``,
    a path that keeps ``path``'s suffix (so writers that pick a format by suffix still work).
    A directory replaces a directory already at ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path
