"""The 2D bundle's configs are the 3D bundle's plus configs/overlay_2d.json (python -m pipeline.bundle_sync)."""

import json
import shutil
from pathlib import Path

from pipeline.bundle_sync import BUNDLES, COPIED, OVERLAY, SOURCE, TARGET, dumps, main, render, stale_files


def test_committed_2d_configs_are_what_the_generator_writes():
    stale = sorted(stale_files())
    assert stale == [], f"{stale} in bundles/{TARGET} are out of date: run python -m pipeline.bundle_sync"


def test_generated_configs_are_formatted_like_the_hand_written_ones():
    for name in ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json", "demo.json"):
        text = (BUNDLES / SOURCE / "configs" / name).read_text()
        assert dumps(json.loads(text)) + "\n" == text, name


def test_the_overlay_is_short_and_only_changes_values():
    overlay = json.loads((BUNDLES / TARGET / OVERLAY).read_text())
    assert set(overlay) == {"train.json", "inference.json"}
    assert sum(len(values) for values in overlay.values()) <= 16
    files = render()
    assert set(files) == set(COPIED) | {"configs/train.json", "configs/inference.json"}
    train = json.loads(files["configs/train.json"])
    assert train["spatial_dims"] == 2 and train["validate"]["inferer"]["_target_"] == "pipeline.inferers.BodySliceInferer"
    assert train["validate"]["postprocessing"] == "%train#postprocessing"  # a reference, as in the model zoo


def test_an_edit_of_the_3d_bundle_reaches_the_2d_bundle(tmp_path, capsys):
    bundles = Path(shutil.copytree(BUNDLES, tmp_path / "bundles", ignore=shutil.ignore_patterns("models", "logs", "eval")))
    train_3d = bundles / SOURCE / "configs" / "train.json"
    config = json.loads(train_3d.read_text())
    config["early_stop_patience"] = 7
    train_3d.write_text(dumps(config) + "\n")

    assert main(["--bundles", str(bundles), "--check"]) == 1
    assert "configs/train.json: out of date; run python -m pipeline.bundle_sync" in capsys.readouterr().out
    assert main(["--bundles", str(bundles)]) == 0
    assert main(["--bundles", str(bundles), "--check"]) == 0
    train_2d = json.loads((bundles / TARGET / "configs" / "train.json").read_text())
    assert (train_2d["early_stop_patience"], train_2d["spatial_dims"]) == (7, 2)
