"""``python -m pipeline prune``: the level table and plot, the choice, the exported pruned bundle, CPU serving."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import prune, segment
from pipeline.settings import record_serving, serving_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_bundle import model_zoo_ci  # noqa: E402  the model zoo's CI steps, shared with the bundle tests

ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
SMALL = ["--features", "[4,8,16]", "--depth", "2", "--norm", "batch", "--roi_size", "[32,32,32]", "--num_samples", "2"]
WINDOW = ["--override", "sw_roi_size=[64,64,64]"]  # the demo overlay's window: the whole 64^3 volume


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny bundle trained for a few steps with the bundle's train config: (bundle, dataset_dir, datalist)."""
    from pipeline.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("prune")
    data = root / "data"
    write_demo_data(data, sets=("synthetic_3d",))
    content = json.loads((data / "synthetic_3d.json").read_text())
    for section, count in (("training", 4), ("validation", 2), ("test", 2)):
        content[section] = content[section][:count]
    datalist = data / "small.json"
    datalist.write_text(json.dumps(content))
    bundle = root / "bundle"
    shutil.copytree(os.path.join(REPO, "bundles", "unetpp_3d_seg"), bundle, ignore=shutil.ignore_patterns("models", "logs", "eval"))
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--dataset_dir", str(data),
         "--datalist", str(datalist), *SMALL, "--sw_roi_size", "[64,64,64]", "--max_epochs", "2", "--val_interval", "2",
         "--learning_rate", "0.01", "--progress_bar", "False", "--num_workers", "0", "--cache_rate", "0"],
        cwd=bundle, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    return bundle, data, datalist


def prune_args(trained, *extra):
    bundle, data, datalist = trained
    return ["--bundle", str(bundle), "--dataset-dir", str(data), "--datalist", str(datalist), *WINDOW, *extra]


def settings_of(bundle):
    return json.loads((bundle / "models" / "settings.json").read_text())


def test_prune_writes_table_and_plot_and_records_a_choice_consistent_with_the_table(trained, capsys):
    bundle = trained[0]
    assert prune.main(prune_args(trained, "--max-dice-drop", "0.05")) == prune.EXIT_OK
    err = capsys.readouterr().err
    docs = bundle / "docs"
    with open(docs / prune.TABLE_CSV) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["option"] for row in rows] == ["L1", "L2", "accurate"]
    for row in rows:
        for column in ("mean_dice", "mean_iou", "mean_hd95_mm", "seconds_per_volume", "peak_memory_mb", "parameters", "dice_class0"):
            assert row[column] != "", column
    assert int(rows[0]["parameters"]) < int(rows[1]["parameters"]) < int(rows[2]["parameters"])
    png = (docs / prune.PLOT).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    report = json.loads((docs / prune.TABLE_JSON).read_text())
    table = {row["option"]: row for row in report["rows"]}
    choice = report["choice"]
    chosen = table[choice["option"]]
    # consistent with the table: within the allowed drop from the full network's best, and nothing cheaper is
    reference = max(table["L2"]["mean_dice"], table["accurate"]["mean_dice"])
    assert chosen["mean_dice"] >= reference - 0.05
    cheaper = [r for r in report["rows"] if r["seconds_per_volume"] < chosen["seconds_per_volume"]]
    assert all(r["mean_dice"] < reference - 0.05 for r in cheaper)
    # the head weights: reported beside both references, kept only when they beat both
    fit = report["head_weight_fit"]
    assert len(fit["weights"]) == 2 and abs(sum(fit["weights"]) - 1) < 1e-6
    if fit["kept"]:
        assert table["accurate"]["mean_dice"] > max(fit["equal_mean_dice"], fit["deepest_head_dice"])
    # recorded where segment and inference read it
    saved = settings_of(bundle)
    if choice["option"] == "accurate":
        assert saved["mode"] == "accurate" and "prune_level" not in saved
    else:
        assert (saved["mode"], saved["prune_level"]) == ("fast", chosen["level"])
    assert saved["precision"] in ("fp32", "bf16") and saved["precision"] == choice["precision"]
    assert choice["precision_note"]
    assert f"chose {choice['option']}" in err


def test_an_impossible_budget_says_so_and_records_nothing(trained, capsys):
    bundle = trained[0]
    before = settings_of(bundle)
    code = prune.main(prune_args(trained, "--budget-seconds", "0.000001", "--max-cases", "1", "--precision", "fp32"))
    assert code == prune.EXIT_NO_LEVEL == 3
    err = capsys.readouterr().err
    assert "no level meets a budget of 1e-06 s per volume" in err and "nothing recorded" in err
    assert settings_of(bundle) == before
    assert json.loads((bundle / "docs" / prune.TABLE_JSON).read_text())["choice"] is None


def test_usage_errors(tmp_path, capsys):
    assert prune.main(["--bundle", str(tmp_path), "--max-dice-drop", "-1"]) == prune.EXIT_USAGE
    assert prune.main(["--bundle", str(tmp_path)]) == prune.EXIT_USAGE
    assert "cannot prepare" in capsys.readouterr().err


def test_the_exported_pruned_bundle_passes_the_zoo_checks_and_gives_fast_mode_masks(trained, tmp_path):
    bundle, data, _ = trained
    exported = tmp_path / "pruned_L1"
    code = prune.main(prune_args(trained, "--max-dice-drop", "1", "--max-cases", "1", "--precision", "fp32",
                                 "--no-record", "--export", str(exported), "--export-level", "1"))  # fmt: skip
    assert code == prune.EXIT_OK
    weights = torch.load(exported / "models" / "model.pt", weights_only=True)
    full = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(weights) < set(full) and not any(key.startswith(("nodes.x0_2", "nodes.x2_0", "nodes.x1_1", "heads.x0_2")) for key in weights)
    assert settings_of(exported)["depth"] == 1 and settings_of(exported)["features"] == [4, 8]

    result = model_zoo_ci(exported)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "model zoo checks passed" in result.stdout

    # the same network output as fast mode at level 1 ...
    images = data / "synthetic_3d" / "imagesTs"
    full_l1 = segment.load_bundle(bundle, overrides={"network_def#mode": "fast", "network_def#prune_level": 1}, device="cpu")
    pruned = segment.load_bundle(exported, device="cpu")
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pruned.network(x), full_l1.network(x), rtol=1e-5, atol=1e-5)
    # ... and the same masks through segment
    out_full, out_pruned = tmp_path / "full_l1", tmp_path / "pruned"
    common = ["--input", str(images), "--quiet", "--precision", "fp32", *WINDOW]
    assert segment.main(["--bundle", str(bundle), "--output", str(out_full), "--mode", "fast", "--prune-level", "1", *common]) == 0
    assert segment.main(["--bundle", str(exported), "--output", str(out_pruned), *common]) == 0
    masks = sorted(out_full.glob("*_seg.nii.gz"))
    assert masks
    for mask in masks:
        assert np.array_equal(np.asarray(nib.load(mask).dataobj), np.asarray(nib.load(out_pruned / mask.name).dataobj)), mask.name


def test_segment_uses_the_recorded_level_and_precision_by_default(trained, tmp_path):
    bundle, data, _ = trained
    before = (bundle / "models" / "settings.json").read_text()
    try:
        record_serving(bundle / "models", {"mode": "fast", "prune_level": 1, "precision": "fp32"})
        out = tmp_path / "out"
        assert segment.main(["--bundle", str(bundle), "--input", str(data / "synthetic_3d" / "imagesTs"), "--output", str(out),
                             "--quiet", *WINDOW]) == 0  # fmt: skip
        record = json.loads(next((out / "records").glob("*.json")).read_text())
        assert record["settings"]["overrides"]["network_def#mode"] == "fast"
        assert record["settings"]["overrides"]["network_def#prune_level"] == 1
        assert record["settings"]["precision"] == "fp32"
    finally:
        (bundle / "models" / "settings.json").write_text(before)


# ------------------------------------------------------------------------------------------------
# without a trained bundle
# ------------------------------------------------------------------------------------------------

ROWS = [
    {"option": "L1", "level": 1, "mean_dice": 0.88, "seconds_per_volume": 1.0, "parameters": 10},
    {"option": "L2", "level": 2, "mean_dice": 0.93, "seconds_per_volume": 2.0, "parameters": 40},
    {"option": "L3", "level": 3, "mean_dice": 0.935, "seconds_per_volume": 3.0, "parameters": 160},
    {"option": "accurate", "level": 3, "mean_dice": 0.933, "seconds_per_volume": 3.2, "parameters": 165},
]


def test_choose_by_dice_drop_by_budget_and_both():
    assert prune.choose(ROWS, max_dice_drop=0.01)[0]["option"] == "L2"
    assert prune.choose(ROWS, max_dice_drop=0.0)[0]["option"] == "L3"
    assert prune.choose(ROWS)[0]["option"] == "L2"  # default drop 0.01
    assert prune.choose(ROWS, budget_seconds=2.5)[0]["option"] == "L2"  # the most accurate within 2.5 s
    assert prune.choose(ROWS, budget_seconds=10)[0]["option"] == "L3"
    assert prune.choose(ROWS, budget_seconds=2.5, max_dice_drop=0.1)[0]["option"] == "L1"
    choice, reason = prune.choose(ROWS, budget_seconds=0.5)
    assert choice is None and "no level meets a budget of 0.5 s per volume" in reason and "L1" in reason


def test_head_weight_fit_finds_the_better_head():
    label = torch.zeros(1, 8, 8, 8)
    label[:, 2:6, 2:6, 2:6] = 1
    good = (label * 2 - 1) * 5  # logits that segment the label exactly
    bad = -good
    weights, score = prune.fit_head_weights([[bad, good]], [label], 1)
    assert score == 1.0 and weights[1] > weights[0]


def test_serving_settings_round_trip(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"depth": 3, "mode": "accurate", "head_weights": [1, 2, 3]}))
    record_serving(tmp_path, {"mode": "fast", "prune_level": 2, "precision": "bf16"})
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved == {"depth": 3, "mode": "fast", "prune_level": 2, "precision": "bf16"}  # old head weights dropped
    assert serving_overrides(saved) == {"network_def#mode": "fast", "network_def#prune_level": 2}
    assert serving_overrides({"mode": "accurate", "head_weights": [0, 1]}) == {
        "network_def#mode": "accurate", "network_def#head_weights": [0.0, 1.0]}
    assert serving_overrides({"depth": 3}) == {}
    with pytest.raises(ValueError, match="not serving settings"):
        record_serving(tmp_path, {"depth": 2})
