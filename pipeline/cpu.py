"""Serving on a CPU: the cores this process may use, native bfloat16, and memory reused across sliding windows.

``segment``, ``prune`` and the bundles' inference call ``apply_thread_count()`` before the first
volume; ``AutocastInferer`` runs CPU inference inside ``keep_freed_memory()``, and ``segment``
holds one such block over its whole batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import threading
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["available_cores", "apply_thread_count", "native_bf16", "keep_freed_memory", "hand_back_freed_memory"]

# glibc's mallopt parameters (malloc.h). Setting any of them turns off glibc's own adjustment of
# the mmap and trim thresholds for good, so leaving the block sets the values that adjustment
# settles on once blocks of 32 MB or more have been freed (its ceiling, and twice that), with the
# default count of mmaps.
_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD = -1, 64 * 1024 * 1024
_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD = -3, 32 * 1024 * 1024
_M_MMAP_MAX, _DEFAULT_MMAP_MAX = -4, 65536
_GLIBC_TUNING_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota (containers).

    ``os.cpu_count()`` counts the machine's cores; a container limited to 4 of 64 would then
    run 64 threads on 4 cores, each waiting for the others.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = None
    try:  # cgroup v2: "max 100000" or "400000 100000"
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        try:  # cgroup v1
            limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            quota = limit / period if limit > 0 and period > 0 else None
        except (OSError, ValueError):
            quota = None
    if quota:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def apply_thread_count(processes: int | None = None) -> int:
    """Set PyTorch's intra-op threads to the cores available to this process, shared by ``processes``.

    ``processes`` defaults to torchrun's ``LOCAL_WORLD_SIZE`` (ranks on this machine). An explicit
    ``OMP_NUM_THREADS`` in the environment wins. Returns the thread count in use.
    """
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return torch.get_num_threads()
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = max(1, available_cores() // max(1, processes))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a GPU that supports it, a CPU with AVX512-BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def _glibc_malloc():
    """glibc's ``mallopt`` and ``malloc_trim``, or None (another C library, or the environment tunes malloc)."""
    if any(name in os.environ for name in _GLIBC_TUNING_ENV):
        return None
    return _glibc_malloc_functions()


@functools.lru_cache(maxsize=None)
def _glibc_malloc_functions():
    """Looked up once: ``find_library`` runs ``ldconfig`` in a subprocess on every call."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: macOS, musl, Windows
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return mallopt, malloc_trim


_keeping = {"depth": 0, "lock": threading.Lock()}


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Inside: glibc keeps freed blocks of any size for reuse. On leaving: its usual thresholds, and the kept pages go back.

    Why: glibc serves every block over 32 MB with its own ``mmap`` and unmaps it when freed. One
    16-channel 96^3 activation is 56 MB, so every such tensor of every sliding window would be
    faulted in afresh, page by page (about 14,000 page faults and 14 ms per tensor: more than the
    group norm that fills it). Inside this block ``mmap`` is off and the heap is never trimmed, so
    the next window reuses the same pages. On leaving, ``malloc_trim`` hands the free pages back,
    so a batch does not hold one volume's working set while it reads and writes the next.
    ``AutocastInferer`` runs every CPU inference inside it (one whole sliding window per volume).

    ``segment`` on a CPU holds one block for its whole batch, so each case also reuses the pages
    of the one before (the first windows of a case no longer fault them in again); after a large
    case it hands them back (:func:`hand_back_freed_memory`). A process forked inside a block (a
    reader) starts outside it, with glibc's usual thresholds.

    Nested and threaded use is safe (the outermost block decides). Does nothing where the
    environment already tunes glibc's malloc (``MALLOC_*_``, ``GLIBC_TUNABLES``) or the C library
    is not glibc. Yields whether it is in effect.
    """
    functions = _glibc_malloc()
    if functions is None:
        yield False
        return
    mallopt, malloc_trim = functions
    with _keeping["lock"]:
        _keeping["depth"] += 1
        if _keeping["depth"] == 1:
            mallopt(_M_MMAP_MAX, 0)
            mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # the largest int: never trim the top of the heap
    try:
        yield True
    finally:
        with _keeping["lock"]:
            _keeping["depth"] -= 1
            if _keeping["depth"] == 0:
                _usual_malloc(mallopt, malloc_trim)


def hand_back_freed_memory() -> None:
    """Inside :func:`keep_freed_memory`: hand the kept pages back now (``malloc_trim``), staying in the block."""
    functions = _glibc_malloc()
    if functions is not None:
        _, malloc_trim = functions
        malloc_trim(0)


def _usual_malloc(mallopt, malloc_trim) -> None:
    """glibc's thresholds as its own adjustment settles them, and the free pages handed back."""
    mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
    malloc_trim(0)


def _start_forked_child_outside_the_block() -> None:
    """In a child forked inside :func:`keep_freed_memory` (a reader process): no block, glibc's
    usual thresholds, and the parent's kept pages dropped from the child's copy."""
    inside = _keeping["depth"] > 0
    _keeping["depth"], _keeping["lock"] = 0, threading.Lock()  # a lock held by another thread at the fork stays held
    functions = _glibc_malloc() if inside else None
    if functions is not None:
        _usual_malloc(*functions)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_start_forked_child_outside_the_block)
