"""Per-epoch data loading time: plain Dataset vs CacheDataset vs PersistentDataset, demo sets.

    python benchmarks/bench_data.py [--data-dir OUT] [--sets synthetic_3d synthetic_2d mni]
                                    [--epochs 2] [--num-workers 0]

Each dataset runs the training chain of ``pipeline.transforms.train_transforms`` over the
``training`` section of ``data_lists/<set>.json`` through a ``DataLoader``; ``setup_s`` is
the constructor (CacheDataset loads and preprocesses everything there), ``epoch_s`` one
pass. PersistentDataset writes its cache on epoch 1 and reads it from epoch 2.
Prints one JSON document. Without ``--data-dir`` the demo data are written to a temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import monai
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.utils import set_determinism

from pipeline.data import load_datalist
from pipeline.demo_data import SETS, write_demo_data
from pipeline.transforms import train_transforms

DATA_LISTS = Path(__file__).resolve().parents[1] / "data_lists"
CHAINS = {  # the settings the bundles use for these sets (small ROIs for CPU)
    "synthetic_3d": dict(spatial_dims=3, preset="scale", roi_size=(48, 48, 48), num_samples=2),
    "synthetic_2d": dict(spatial_dims=2, preset="scale", roi_size=(96, 96), num_samples=4),
    "mni": dict(spatial_dims=3, preset="mri", roi_size=(64, 64, 64), num_samples=2),
}


def run_epochs(dataset, epochs: int, num_workers: int) -> list[float]:
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=num_workers)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for batch in loader:
            assert batch["image"].shape[0] > 0
        times.append(time.perf_counter() - start)
    return times


def bench_set(name: str, data_dir: Path, cache_dir: Path, epochs: int, num_workers: int) -> list[dict]:
    entries = load_datalist(DATA_LISTS / f"{name}.json", data_dir)
    transform = train_transforms(**CHAINS[name])
    makers = {
        "Dataset": lambda: Dataset(entries, transform),
        "CacheDataset": lambda: CacheDataset(entries, transform, cache_rate=1.0, num_workers=None, progress=False),
        "PersistentDataset": lambda: PersistentDataset(entries, transform, cache_dir=cache_dir / name),
    }
    rows = []
    for kind, make in makers.items():
        set_determinism(0)
        start = time.perf_counter()
        dataset = make()
        setup = time.perf_counter() - start
        times = run_epochs(dataset, epochs, num_workers)
        rows.append(
            {
                "set": name,
                "dataset": kind,
                "volumes": len(entries),
                "setup_s": round(setup, 3),
                **{f"epoch{i + 1}_s": round(t, 3) for i, t in enumerate(times)},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder written by `python -m pipeline demo-data`")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        data_dir = Path(args.data_dir) if args.data_dir else scratch / "demo"
        if not args.data_dir:
            write_demo_data(data_dir, sets=args.sets)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        results = []
        for name in args.sets:
            results += bench_set(name, data_dir, scratch / "persistent", args.epochs, args.num_workers)
        report = {
            "benchmark": "data loading per epoch (train_transforms, batch 2)",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__},
            "num_workers": args.num_workers,
            "results": results,
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
