"""Scale-out under ``torchrun``: ranks share the case list at the start and meet through files at the end."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from pathlib import Path
from typing import Any

from pipeline.fileio import read_json
from pipeline.segment.records import RECORDS_DIR

__all__ = ["dist_env", "init_dist", "rank_done_path", "wait_for_ranks", "broadcast", "destroy"]


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


def init_dist(world_size: int, timeout_s: float = 1800) -> bool:
    """Process group for broadcasting the case list and run id at the start (gloo: CPU objects only).

    The end of the run is synchronised through files in ``OUT/records`` instead (see
    :func:`wait_for_ranks`): ranks finish hours apart on uneven shards, and a collective with a
    timeout that long would also turn any start-up problem into a hang.
    """
    if world_size <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank_done_path(out: Path, run_id: str, rank: int) -> Path:
    return out / RECORDS_DIR / f".rank{rank}.{run_id}.json"


def wait_for_ranks(out: Path, run_id: str, world_size: int, timeout_s: float) -> list[dict | None]:
    """Rank 0: wait until every rank has written its completion file (its statistics), or time out.

    Returns each rank's statistics (``None`` for a rank that never finished; its cases show as
    ``missing``) and removes the files.
    """
    deadline = time.monotonic() + timeout_s
    paths = [rank_done_path(out, run_id, r) for r in range(world_size)]
    while time.monotonic() < deadline and not all(p.exists() for p in paths):
        time.sleep(0.5)
    stats = [read_json(p, missing_ok=True) for p in paths]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stats


def broadcast(value: Any, distributed: bool) -> Any:
    """``value`` from rank 0 on every rank (unchanged when not distributed)."""
    if not distributed:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
