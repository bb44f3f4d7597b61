"""`benchmarks/paper_table.py --quick` produces a complete, well-formed table, JSON and plots."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("mni_2d", "mni_3d", "synthetic_2d", "synthetic_3d")
VARIANTS = ("unet", "wide_unet", "unetpp", "unetpp_ds_accurate", "unetpp_ds_L1", "unetpp_ds_L2", "unetpp_ds_L3", "unetpp_ds_L4")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("nilearn", reason="the MNI experiments need nilearn's package data")
    out = tmp_path_factory.mktemp("paper_table")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "paper_table.py"), "--quick", "--out-dir", str(out)],
        capture_output=True,
        text=True, encoding="utf-8", errors="replace",
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


def test_json_has_every_experiment_variant_and_metric(quick_run):
    out, run = quick_run
    report = json.loads((out / "paper_results.json").read_text(encoding="utf-8"))
    assert report["quick"] is True
    assert report["machine"]["nproc"] >= 1 and report["machine"]["threads"] == 1
    assert set(report["experiments"]) == set(EXPERIMENTS)
    for name, result in report["experiments"].items():
        settings, summary = result["settings"], result["summary"]
        assert len(result["runs"]) == settings["seeds"] == 1
        classes = list(settings["classes"].values())
        assert len(classes) == (3 if name.startswith("mni") else 1)
        assert set(summary) == set(VARIANTS)
        for variant, entry in summary.items():
            assert entry["parameters"] > 0 and entry["infer_seconds_median"] > 0
            assert entry["train_seconds"]["mean"] > 0
            for metric in ("mean_iou", "mean_dice"):
                assert 0.0 <= entry[metric]["mean"] <= 100.0, (name, variant, metric)
            for cls in classes:
                for metric in ("iou", "dice"):
                    value = entry[metric][cls]["mean"]
                    assert math.isnan(value) or 0.0 <= value <= 100.0
        # pruning really removes parameters, and L4 carries all of the trained network but three heads
        pruned = [summary[f"unetpp_ds_L{k}"]["parameters"] for k in (1, 2, 3, 4)]
        assert pruned == sorted(pruned) and len(set(pruned)) == 4
        assert pruned[-1] < summary["unetpp_ds_accurate"]["parameters"]
        assert summary["wide_unet"]["parameters"] > summary["unet"]["parameters"]
        assert summary["unetpp_ds_L4"]["time_vs_L4"] == 1.0
        for model, curve in result["runs"][0]["curves"].items():
            assert curve["step"][-1] == settings["steps"], model
            assert all(math.isfinite(v) for v in curve["final_head_loss"])
        if name.startswith("mni"):  # train and test slabs are disjoint, with a gap
            slabs = settings["slabs_z"]
            test = slabs["test_middle"]
            assert slabs["train_inferior"][1] < test[0] and test[1] < slabs["train_superior"][0]
    # the paper configuration's parameter counts (2D, 32..512) are reported next to the paper's
    counts = report["paper_preset_parameters"]
    assert abs(counts["unetpp"] / 9.04e6 - 1) < 0.01 and abs(counts["unet"] / 7.76e6 - 1) < 0.01
    assert set(report["claims"]["average"]) >= {"ds_accurate_minus_unet", "L3_time_saving_vs_L4", "L3_minus_L4_iou"}
    summary_line = json.loads(run.stdout)
    assert summary_line["claims"] == report["claims"]


def test_markdown_tables_are_complete_and_rectangular(quick_run):
    out, _ = quick_run
    text = (out / "paper_table.md").read_text(encoding="utf-8")
    assert "QUICK" in text
    for name in EXPERIMENTS:
        assert f"## {name}:" in text
    for label in ("U-Net", "Wide U-Net", "UNet++ w/o DS", "UNet++ w/ DS, accurate", "UNet++ w/ DS, fast L3", "| L1 |", "| L4 |"):
        assert label in text
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert len(tables) == 2 * len(EXPERIMENTS) + 2
    for table in tables:
        columns = {line.count("|") for line in table}
        assert len(columns) == 1, table[0]
        assert set(table[1].replace("|", "").replace(":", "")) == {"-"}
        assert "nan" not in "".join(table[2:]).lower()


def test_plots_are_small_valid_pngs(quick_run):
    out, _ = quick_run
    import matplotlib.image

    for name in ("paper_pruning.png", "paper_curves.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size < 200_000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.01  # not a blank canvas
