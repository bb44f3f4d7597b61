"""Post-processing decided on validation (python -m pipeline postprocess), kept with the weights, applied by default."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from pipeline.postprocess import choose_rules
from pipeline.transforms import ComponentRulesd, apply_component_rule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"features": [4, 8, 16], "depth": 2, "norm": "batch", "preset": "ct", "intensity": {"a_min": -100, "a_max": 300}}


def blobs(shape=(24, 24, 24), big=(4, 14), small=None):
    """A cube of class 1 (``big`` = start, stop on every axis) and optionally a small far-away one."""
    mask = np.zeros(shape, np.uint8)
    mask[big[0]:big[1], big[0]:big[1], big[0]:big[1]] = 1
    if small is not None:
        mask[small[0]:small[1], small[0]:small[1], small[0]:small[1]] = 1
    return mask


def test_component_rules_keep_the_largest_or_drop_small_components_by_volume_in_mm3():
    mask = blobs(small=(18, 21))  # 1000 voxels and 27 voxels
    assert apply_component_rule(mask == 1, 1.0, largest_component=True).sum() == 1000
    assert apply_component_rule(mask == 1, 1.0, min_size_mm3=30).sum() == 1000
    assert apply_component_rule(mask == 1, 1.0, min_size_mm3=20).sum() == 1027
    assert apply_component_rule(mask == 1, 8.0, min_size_mm3=200).sum() == 1027  # 27 voxels of 2 mm: 216 mm^3
    assert apply_component_rule(mask == 1, 8.0, min_size_mm3=300).sum() == 1000
    # the transform reads the voxel volume from the mask's affine (2 mm -> 8 mm^3 per voxel)
    tensor = MetaTensor(torch.from_numpy(mask[None]), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    kept = ComponentRulesd("pred", {"1": {"largest_component": False, "min_size_mm3": 216.5}})({"pred": tensor})["pred"]
    assert int(kept.sum()) == 1000 and isinstance(kept, MetaTensor)
    unchanged = ComponentRulesd("pred", {"1": {"largest_component": False, "min_size_mm3": 215.0}})({"pred": tensor})["pred"]
    assert int(unchanged.sum()) == 1027
    assert ComponentRulesd("pred", None)({"pred": tensor})["pred"] is tensor


def test_a_rule_is_chosen_only_when_it_raises_the_validation_dice():
    truth = blobs()
    spurious = [(blobs(small=(18, 21)), truth, 1.0), (blobs(small=(0, 2)), truth, 1.0)]
    record = choose_rules(spurious, [1])
    assert record["classes"]["1"] in ({"largest_component": True, "min_size_mm3": 0.0},) or record["classes"]["1"]["min_size_mm3"] > 27
    assert record["mean_dice_after"] > record["mean_dice_before"]
    assert record["dice"]["1"]["none"] < record["dice"]["1"]["largest_component"] == 1.0

    # the truth has two components: keeping the largest would lose one, so nothing is chosen
    two = blobs(small=(18, 22))
    record = choose_rules([(two, two, 1.0), (two, two, 1.0)], [1])
    assert record["classes"] == {} and record["mean_dice_after"] == record["mean_dice_before"] == 1.0

    # several classes are decided one by one
    pred = blobs(small=(18, 21))
    pred[0:2, 0:2, 0:2] = 2
    truth2 = truth.copy()
    truth2[18:23, 18:23, 0:5] = 2
    pred[18:23, 18:23, 0:5] = 2
    record = choose_rules([(pred, truth2, 1.0)], [1, 2])
    assert set(record["classes"]) == {"1", "2"}


def trained_bundle(tmp_path):
    """A copy of the 3D bundle as training leaves it (settings.json and weights), tiny network."""
    from ignite.engine import Engine

    bundle = str(tmp_path / "bundle")
    shutil.copytree(os.path.join(REPO, "bundles", "unetpp_3d_seg"), bundle, ignore=shutil.ignore_patterns("models", "eval", "logs"))
    os.makedirs(os.path.join(bundle, "models"), exist_ok=True)
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "train.json"))
    parser.update({"bundle_root": bundle, **TINY})
    parser.get_parsed_content("train#handlers#2")(Engine(lambda engine, batch: None))  # SettingsWriter
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(bundle, "models", "model.pt"))
    return bundle


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from pipeline.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("data")
    write_demo_data(root, sets=("synthetic_3d",))
    content = json.loads((root / "synthetic_3d.json").read_text())
    for section in ("training", "validation", "test"):
        content[section] = content[section][:2]
    (root / "small.json").write_text(json.dumps(content))
    return root


def chains(bundle):
    """The component rules each command applies: evaluate, inference, segment."""
    from pipeline.segment.bundle import load_bundle

    found = {}
    for name, configs, key in (("evaluate", ["train.json", "evaluate.json"], "validate#postprocessing"), ("inference", ["inference.json"], "postprocessing")):
        parser = ConfigParser()
        parser.read_config([os.path.join(bundle, "configs", c) for c in configs])
        parser["bundle_root"] = bundle
        found[name] = _rules(parser.get_parsed_content(key))
    found["segment"] = _rules(load_bundle(bundle, device="cpu").postprocessing)
    return found


def _rules(compose):
    for transform in compose.flatten().transforms:
        if isinstance(transform, ComponentRulesd):
            return transform.rules
    return None


def test_postprocess_command_stores_its_choice_and_every_command_applies_it(tmp_path, small_data, capsys):
    from pipeline.__main__ import main
    from pipeline.settings import save_postprocessing

    bundle = trained_bundle(tmp_path)
    assert chains(bundle) == {"evaluate": None, "inference": None, "segment": None}  # nothing chosen yet

    code = main(["postprocess", "--bundle", bundle, "--dataset-dir", str(small_data), "--datalist", str(small_data / "small.json"),
                 "--override", "num_workers=0"])
    assert code == 0
    out = capsys.readouterr().out  # the engine's log lines, then the record as JSON
    printed = json.loads(out[out.rindex("\n{\n"):] if not out.startswith("{\n") else out)
    settings = json.load(open(os.path.join(bundle, "models", "settings.json")))
    stored = settings["postprocessing"]
    assert stored["cases"] == 2 and stored["section"] == "validation" and set(stored["dice"]) == {"1"}
    assert stored["classes"] == printed["classes"]
    assert {key: settings[key] for key in TINY} == TINY  # the model's settings are kept
    assert not glob.glob(os.path.join(bundle, "eval", "*.csv"))  # the decision's metric CSVs went to a scratch folder

    # whatever was chosen is what every command now applies by default
    rule = {"1": {"largest_component": True, "min_size_mm3": 0.0}}
    save_postprocessing(os.path.join(bundle, "models"), {"classes": rule})
    assert chains(bundle) == {name: {1: rule["1"]} for name in ("evaluate", "inference", "segment")}
