"""Model-zoo checks on both bundles: metadata schema, network in/out, TorchScript export, properties.

These run the standard ``python -m monai.bundle`` commands as a user (or the model zoo's CI) would.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = ["unetpp_3d_seg", "unetpp_2d_seg"]
SCHEMA = os.path.join(REPO, "bundles", "schema", "meta_schema.json")
# small enough for a CPU test, same structure as the defaults
TINY = ["--network_def#features", "[4,8,16,32]", "--network_def#depth", "3"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Demo data with a few cases per split, as overrides: {bundle: {"dataset_dir": ..., "datalist": ...}}."""
    from pipeline.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("data")
    write_demo_data(root, sets=("synthetic_3d", "synthetic_2d"))
    overrides = {}
    for bundle, name in (("unetpp_3d_seg", "synthetic_3d"), ("unetpp_2d_seg", "synthetic_2d")):
        content = json.loads((root / f"{name}.json").read_text())
        for section in ("training", "validation", "test"):
            content[section] = content[section][:2]
        (root / f"{name}_small.json").write_text(json.dumps(content))
        overrides[bundle] = {"dataset_dir": str(root), "datalist": str(root / f"{name}_small.json")}
    return overrides


def workflow(name, configs, workflow_type, small_data, tmp_path, **overrides):
    """A ConfigWorkflow of the bundle on small data with a tiny network, initialized as `monai.bundle run` does."""
    flow = ConfigWorkflow(
        config_file=[bundle_path(name, "configs", c) for c in configs],
        meta_file=bundle_path(name, "configs", "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(tmp_path),
        **small_data[name],
        **{"network_def#features": [4, 8, 16], "network_def#depth": 2, "cache_rate": 0.0, "num_workers": 0},
        **overrides,
    )
    flow.initialize()
    return flow


def bundle_path(name, *parts):
    return os.path.join(REPO, "bundles", name, *parts)


def monai_bundle(*args, cwd=None):
    """``python -m monai.bundle <args>``; returns the completed process (output in .stdout)."""
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name", BUNDLES)
def test_model_zoo_layout(name):
    for part in [
        "configs/metadata.json",
        "configs/train.json",
        "configs/evaluate.json",
        "configs/inference.json",
        "configs/multi_gpu_train.json",
        "configs/demo.json",
        "configs/logging.conf",
        "docs/README.md",
        "LICENSE",
    ]:
        assert os.path.isfile(bundle_path(name, part)), part
    assert "Apache License" in open(bundle_path(name, "LICENSE")).read()
    # weights are produced by training, never committed
    tracked = subprocess.run(["git", "ls-files", bundle_path(name, "models")], cwd=REPO, capture_output=True, text=True)
    assert tracked.returncode == 0, tracked.stderr
    assert tracked.stdout.strip() == ""


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_metadata_against_the_schema_in_the_repo(name):
    result = monai_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", SCHEMA, cwd=bundle_path(name))
    assert result.returncode == 0, result.stdout
    assert "metadata is verified with no error" in result.stdout
    meta = json.load(open(bundle_path(name, "configs", "metadata.json")))
    assert any("UNet++" in ref for ref in meta["references"]) and any("U-Net:" in ref for ref in meta["references"])
    assert "unetpp-pipeline" in meta["required_packages_version"]


def test_verify_metadata_rejects_incomplete_metadata(tmp_path):
    meta = json.load(open(bundle_path("unetpp_3d_seg", "configs", "metadata.json")))
    del meta["references"]
    meta["network_data_format"]["inputs"]["image"].pop("channel_def")
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    result = monai_bundle("verify_metadata", "--meta_file", str(tmp_path / "metadata.json"), "--filepath", SCHEMA)
    assert result.returncode != 0
    assert "references" in result.stdout or "channel_def" in result.stdout


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_verify_net_in_out(name, config):
    result = monai_bundle(
        "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
        "--config_file", f"configs/{config}", "--n", "2", "--device", "cpu", *TINY,
        cwd=bundle_path(name),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert "data shape of network is verified with no error" in result.stdout


@pytest.mark.parametrize("name", BUNDLES)
def test_ckpt_export_torchscript_matches_eager(name, tmp_path):
    parser = ConfigParser()
    parser.read_config(bundle_path(name, "configs", "inference.json"))
    parser["network_def#features"] = [4, 8, 16, 32]
    parser["network_def#depth"] = 3
    torch.manual_seed(0)
    eager = parser.get_parsed_content("network_def")
    for parameter in eager.parameters():  # not the init values: make any wrong mapping visible
        parameter.data.uniform_(-0.5, 0.5)
    torch.save(eager.state_dict(), tmp_path / "model.pt")

    result = monai_bundle(
        "ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"),
        "--ckpt_file", str(tmp_path / "model.pt"), "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.json", *TINY,
        cwd=bundle_path(name),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    size = (1, 1) + (40,) * eager.spatial_dims  # not a multiple of 2**depth: padding is part of the graph
    x = torch.rand(size)
    eager.eval()
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-5)
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == "0.1.0"


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize(
    "workflow_type, configs",
    [
        ("train", ["train.json"]),
        ("infer", ["inference.json"]),
        ("train", ["train.json", "evaluate.json"]),
        ("train", ["train.json", "demo.json"]),
        ("infer", ["inference.json", "demo.json"]),
    ],
)
def test_config_workflow_properties(name, workflow_type, configs, small_data, tmp_path):
    flow = workflow(name, configs, workflow_type, small_data, tmp_path)
    assert flow.check_properties() == []
    assert flow.bundle_root == str(tmp_path)
    if workflow_type == "train":
        assert type(flow.trainer).__name__ == "SupervisedTrainer" and type(flow.evaluator).__name__ == "SupervisedEvaluator"
        assert len(flow.train_dataset) == 2 and flow.max_epochs > 0
    else:
        assert type(flow.evaluator).__name__ == "SupervisedEvaluator" and len(flow.dataset) == 2


@pytest.mark.parametrize("name", BUNDLES)
def test_cpu_bf16_autocasts_every_inferer_on_cpu_only(name, small_data, tmp_path):
    train = workflow(name, ["train.json"], "train", small_data, tmp_path, cpu_bf16=True, device="$torch.device('cpu')")
    infer = workflow(name, ["inference.json"], "infer", small_data, tmp_path, cpu_bf16=True, device="$torch.device('cpu')")
    for inferer in (train.trainer.inferer, train.evaluator.inferer, infer.evaluator.inferer):
        assert type(inferer).__name__ == "AutocastInferer" and inferer.precision == "bf16"
    assert type(train.evaluator.inferer.inferer) is type(infer.parser.get_parsed_content("inferer"))
    # on CUDA, MONAI's amp (float16) is the autocast; cpu_bf16 does not apply there
    for config in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config(bundle_path(name, "configs", config))
        parser.update({"cpu_bf16": True, "device": "$torch.device('cuda:0')"})
        assert parser.get_parsed_content("autocast_precision") == "fp32"
        assert parser.get_parsed_content("amp") is True


@pytest.mark.parametrize("name", BUNDLES)
def test_multi_gpu_overlay_keeps_train_properties(name):
    configs = [bundle_path(name, "configs", c) for c in ("train.json", "multi_gpu_train.json")]
    flow = ConfigWorkflow(config_file=configs, logging_file=False, workflow_type="train")
    # initializing needs a process group (see test_bundle_runs.py); the ids must all be there
    for key in ["train#trainer", "train#dataset", "train#inferer", "train#sampler", "validate#sampler", "network"]:
        assert key in flow.parser, key
    assert flow.parser["train#dataloader#sampler"] == "@train#sampler"
    assert "gloo" in json.dumps(flow.parser["initialize"]) and "nccl" in json.dumps(flow.parser["initialize"])


@pytest.mark.parametrize("name", BUNDLES)
def test_inference_config_exposes_what_batch_segmentation_loads(name, tmp_path):
    """pipeline/segment.py builds the network, preprocessing and inferer from inference.json."""
    parser = ConfigParser()
    parser.read_config(bundle_path(name, "configs", "inference.json"))
    for key in ["network_def", "preprocessing", "inferer", "postprocessing", "output_dir", "dataset_dir",
                "datalist", "device", "bundle_root", "ckpt_path"]:  # fmt: skip
        assert key in parser, key
    parser["bundle_root"] = str(tmp_path)
    assert parser.get_parsed_content("ckpt_path") == os.path.join(str(tmp_path), "models", "model.pt")
    network = parser.get_parsed_content("network_def")
    assert network.mode == "accurate"
    parser["network_def#mode"] = "fast"
    parser["network_def#prune_level"] = 2
    parser.parse(reset=True)
    fast = parser.get_parsed_content("network_def")
    assert (fast.mode, fast.prune_level) == ("fast", 2)
    assert set(fast.state_dict()) == set(network.state_dict())  # the same weights load into either mode
    inferer = parser.get_parsed_content("inferer")
    assert inferer.mode == "gaussian" and inferer.overlap == 0.5
    assert type(inferer).__name__ == ("SlidingWindowInferer" if name == "unetpp_3d_seg" else "SliceInferer")
    assert callable(parser.get_parsed_content("preprocessing"))


@pytest.mark.parametrize("name", BUNDLES)
def test_demo_overlay_only_sets_top_level_ids_of_train_json(name):
    """So configs/demo.json overlays train.json, evaluate.json and inference.json alike."""
    demo = json.load(open(bundle_path(name, "configs", "demo.json")))
    train = json.load(open(bundle_path(name, "configs", "train.json")))
    assert [key for key in demo if key not in train] == []
    assert all("#" not in key for key in demo)
