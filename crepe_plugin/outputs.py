"""Output folders: what a command may write into or replace, checked before anything is touched.

Two kinds of output:

- a checkpoint (`crepe prune --out`, the demo's): written whole into a hidden sibling and renamed
  onto the target (``atomic_output``). With ``--overwrite`` it replaces only an earlier output of
  ours (it carries ``OUTPUT_MARKER``, the ``crepe_sparsity`` record or ``INCOMPLETE_MARKER``) or
  an empty directory;
- a search folder (`crepe search --out`): written file by file and resumed (``search_folder``).
  It must be new, empty or an earlier search's folder, and never a folder holding a model: a
  loader that globs ``*.safetensors`` would read the search's statistics as weights.

Either target is refused when it is, contains or lies inside an input (the source model, the
recipe, the calibration text). A replaced target must also not be the working directory or one
of its ancestors. Every check runs before the first file is moved, deleted or written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from loguru import logger

__all__ = ["OutputError", "INCOMPLETE_MARKER", "OUTPUT_MARKER", "atomic_output", "search_folder", "checked_target"]

INCOMPLETE_MARKER = ".crepe-incomplete"
OUTPUT_MARKER = ".crepe-output"
# what marks a `crepe search --out` folder (pho/calib.STATS_FILE, pho/report.VALIDATION_FILE)
SEARCH_SIGNATURE = ("pho.db", "calib_stats.safetensors", "validation.jsonl", "best_*.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


class OutputError(ValueError):
    """An output target would destroy or corrupt something that is not ours to replace."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def checked_target(out: str | Path, inputs: list[tuple[str, Path]] = (), replacing: bool = True,
                   flag: str = "--out") -> Path:  # fmt: skip
    """The resolved target, or OutputError when it is empty, is/contains/lies inside an input
    (``inputs``: (what, path) pairs), or (``replacing``) is the working directory or holds it."""
    if not str(out).strip():
        raise OutputError(f"{flag} is empty (an unset shell variable?); name a new directory")
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if replacing and _inside(cwd, target):
        where = "is the working directory" if target == cwd else f"holds the working directory ({cwd})"
        raise OutputError(f"{flag} {str(out)!r} {where}; it cannot be replaced; name a new directory")
    for what, p in inputs:
        p = Path(p).expanduser().resolve()
        why = ("is the" if target == p else "contains the" if _inside(p, target) else
               "lies inside the" if _inside(target, p) else None)  # fmt: skip
        if why:
            which = what if target == p else f"{what} ({p})"
            raise OutputError(f"{flag} {target} {why} {which}; name a new directory outside it")
    return target


def _check_writable(target: Path, flag: str) -> None:
    """The nearest existing folder above ``target`` must take new entries (not a read-only file
    system, not a file): refused before any work, not after it."""
    anchor = target.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputError(f"{flag} {target}: {anchor} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {target}: cannot write in {anchor} (a read-only file system, or no permission)")


def _entries(d: Path, flag: str) -> list[Path]:
    try:
        return sorted(d.iterdir())
    except OSError as e:
        raise OutputError(f"{flag} {d}: cannot read it ({e.strerror or e})") from None


def is_search_folder(d: Path) -> bool:
    return any(any(d.glob(pattern)) for pattern in SEARCH_SIGNATURE)


def holds_model(entries: list[Path]) -> Path | None:
    """The first entry that makes a folder a model (config.json, a weight file), or None."""
    return next((e for e in entries if e.name == "config.json" or (e.suffix in WEIGHT_SUFFIXES and e.name != "calib_stats.safetensors")), None)  # fmt: skip


def is_our_output(d: Path) -> bool:
    """An earlier output of ours: our marker, our incomplete marker, or our record."""
    if (d / OUTPUT_MARKER).is_file() or (d / INCOMPLETE_MARKER).exists():
        return True
    try:
        from .checkpoint.record import RECORD_KEY

        return isinstance(json.loads((d / "config.json").read_text()).get(RECORD_KEY), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _check_replaceable(target: Path, overwrite: bool, flag: str) -> None:
    """An existing target may be replaced only when ours or empty, and only with ``overwrite``."""
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir():
        raise OutputError(f"{flag} {target} exists and is not a directory; name a new directory")
    entries = _entries(target, flag)
    if entries and is_search_folder(target) and not is_our_output(target):
        raise OutputError(f"{flag} {target} is a `crepe search` folder, not a checkpoint; name a new directory")
    if entries and not is_our_output(target):
        raise OutputError(
            f"{flag} {target} exists and is not an earlier crepe output (no {OUTPUT_MARKER} marker, no crepe_sparsity "
            f"record; it holds e.g. {entries[0].name}); --overwrite replaces only those or an empty directory"
        )
    if not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")


def search_folder(out: str | Path, inputs: list[tuple[str, Path]] = (), flag: str = "--out") -> tuple[Path, bool]:
    """(the checked folder, whether it must be created) for ``crepe search --out``.

    Refused: a file, a folder holding a model, a non-empty folder that is not an earlier search,
    and one that is, contains or lies inside an input. Nothing is created here."""
    target = checked_target(out, inputs, replacing=False, flag=flag)
    if not target.exists():
        _check_writable(target, flag)
        return target, True
    if not target.is_dir():
        raise OutputError(f"{flag} {target} exists and is not a directory")
    entries = _entries(target, flag)
    model = holds_model(entries)
    if model is not None:
        raise OutputError(
            f"{flag} {target} holds a model ({model.name}); the search would write its statistics "
            "(calib_stats.safetensors) beside the weights, where a loader reads them as weights; name a new folder"
        )
    if entries and not is_search_folder(target):
        raise OutputError(
            f"{flag} {target} holds files that are not from a crepe search (e.g. {entries[0].name}); "
            "name a new or empty folder (an earlier search's folder is resumed)"
        )
    return target, False


def _pid_alive(name: str) -> bool:
    try:
        pid = int(name.rsplit("-", 1)[-1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fsync_tree(d: Path) -> None:
    """Flush every file under ``d`` and the directories themselves to disk."""
    for f in sorted(d.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for sub in [d, *sorted(x for x in d.rglob("*") if x.is_dir())]:
        _fsync_dir(sub)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class atomic_output:
    """Context manager: write into a hidden sibling directory, rename onto ``out`` on success.

    - Constructing it checks the target (``checked_target`` against ``inputs`` and the working
      directory; an existing target must be ours or empty, and ``overwrite`` given) before
      anything is moved or deleted.
    - An interrupted run (exception, Ctrl-C, SIGTERM) leaves no ``out`` and removes its own
      temporary directory; a killed one leaves only ``.NAME.tmp-PID`` marked incomplete, which
      the next run into the same ``out`` removes (unless that process still runs).
    - The written files and directories are fsynced before the rename; ``OUTPUT_MARKER`` says
      the directory is ours, so a later ``--overwrite`` may replace it.
    - With ``overwrite``, the old checkpoint is first renamed to ``.NAME.old-PID`` and the new
      one renamed into place; the old one is removed only after that. A crash between the two
      renames leaves the new checkpoint complete in ``.NAME.tmp-PID`` and the old one in
      ``.NAME.old-PID``: the next run moves the old one back before it starts, so ``out``
      is never lost.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, inputs: list[tuple[str, Path]] = ()):
        self.out = checked_target(out, inputs)
        self.overwrite = overwrite
        _check_replaceable(self.out, overwrite, "--out")
        _check_writable(self.out, "--out")
        if self._recover() and not overwrite:  # the restored checkpoint is ours (we moved it aside)
            raise FileExistsError(f"{self.out} exists; pass --overwrite to replace it")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        self._old_handler = None

    def _siblings(self, kind: str) -> list[Path]:
        if not self.out.parent.is_dir():
            return []
        return sorted(self.out.parent.glob(f".{self.out.name}.{kind}-*"))

    def _recover(self) -> bool:
        """Undo what a killed earlier run left: restore an old checkpoint whose replacement
        never arrived (then True), and delete temporary directories marked incomplete."""
        olds = [d for d in self._siblings("old") if not _pid_alive(d.name)]
        restored = bool(olds) and not self.out.exists()
        if restored:
            os.replace(olds[-1], self.out)
            logger.warning(f"restored {self.out} from {olds[-1].name}, left by an interrupted --overwrite")
            olds = olds[:-1]
        for d in olds:
            shutil.rmtree(d, ignore_errors=True)
        for d in self._siblings("tmp"):
            if not _pid_alive(d.name) and ((d / INCOMPLETE_MARKER).exists() or not any(d.iterdir())):
                shutil.rmtree(d, ignore_errors=True)
        return restored

    def _on_sigterm(self, signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self) -> Path:
        import signal
        import threading

        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
            (self.tmp / INCOMPLETE_MARKER).write_text("interrupted save; do not use\n")
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise OutputError(f"--out {self.out}: cannot write in {self.out.parent} ({e.strerror or e})") from None
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)  # clean up as for Ctrl-C
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        import signal

        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            _check_replaceable(self.out, self.overwrite, "--out")  # something may have appeared meanwhile
        except (OutputError, FileExistsError):
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        from . import __version__

        (self.tmp / OUTPUT_MARKER).write_text(f"written by crepe-plugin {__version__}; "
                                              "`crepe prune --overwrite` may replace this directory\n")  # fmt: skip
        (self.tmp / INCOMPLETE_MARKER).unlink(missing_ok=True)
        _fsync_tree(self.tmp)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
