"""File I/O every part of the pipeline shares: atomic writes, digests, JSON reading.

One place for these so that checkpoints, training curves, segmentation records and
summaries all get the same guarantee: a file at its final path is either the old complete
file or the new complete file, never a truncated one, even after a ``SIGKILL`` or a power
loss. A write goes to a temporary sibling (same folder, so the rename is atomic), is
flushed and ``fsync``'d, renamed over the target with ``os.replace``, and the folder is
``fsync``'d so the rename itself is durable (POSIX).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = [
    "TMP_PREFIX",
    "tmp_path_for",
    "remove_stale_tmp",
    "fsync_file",
    "fsync_dir",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_torch_save",
    "sha256",
    "read_json",
    "LockHeld",
    "FolderLock",
]

# Temporaries are hidden files named ``.tmp.<pid>.<final name>``: the suffix is kept (writers such
# as nibabel and matplotlib choose the format by it) and a later run can tell whose file it was.
TMP_PREFIX = ".tmp."


def tmp_path_for(final: str | os.PathLike) -> Path:
    """Temporary sibling of ``final`` for this process (same folder, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}.{final.name}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(final: str | os.PathLike) -> None:
    """Delete temporaries of ``final`` left by killed processes (never a live process's file)."""
    final = Path(final)
    pattern = re.compile(re.escape(TMP_PREFIX) + r"(\d+)\." + re.escape(final.name) + "$")
    if not final.parent.is_dir():
        return
    for path in final.parent.iterdir():
        match = pattern.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames and new entries in ``folder`` durable (a no-op where folders cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(handle)`` on a temporary binary file and rename it over ``path`` (see the module doc).

    On any error the temporary is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, newlines written as given (CSV writers choose their own)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` so that ``path`` is always either the old or the new complete file."""
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, missing_ok: bool = False) -> dict | None:
    """A JSON object from ``path``.

    ``missing_ok=False``: raises ``FileNotFoundError`` or ``ValueError`` naming the file when it is
    absent, not UTF-8 JSON, or not an object. ``missing_ok=True``: returns ``None`` in those cases
    instead (for records that a killed run may have left half-written or never written).
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        if missing_ok:
            return None
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(content, dict):
        if missing_ok:
            return None
        raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it (pid, host, since when)."""


class FolderLock:
    """An advisory lock on a folder: one writer at a time (``fcntl.flock`` on ``<folder>/<name>``).

    The lock file holds the holder's pid, host and start time, so a refused run can say who
    holds it. The operating system releases a ``flock`` when its process dies, however it dies,
    so a lock left by a killed run is simply free: no stale-lock guessing. On platforms without
    ``fcntl`` (Windows) it locks nothing. Use as a context manager::

        with FolderLock(out, wait=False):
            ...  # LockHeld raised at entry when another run holds out/.segment.lock
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".lock", wait: bool = False, poll_s: float = 2.0):
        self.path = Path(folder) / name
        self.wait = wait
        self.poll_s = poll_s
        self._handle = None

    def __enter__(self) -> "FolderLock":
        import datetime
        import socket
        import time

        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.wait:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    handle.close()
                    raise LockHeld(f"{self.path.parent} is in use by {holder}") from None
                time.sleep(self.poll_s)
        handle.seek(0)
        handle.truncate()
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the flock; the file stays as the folder's marker
            self._handle = None
