"""Model-zoo checks on both bundles: metadata schema, network in/out, TorchScript export, properties.

These run the standard ``python -m monai.bundle`` commands as a user would, and the model zoo's
own CI steps (``ci/verify_bundle.py`` of Project-MONAI/model-zoo) with their default arguments.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = ["unetpp_3d_seg", "unetpp_2d_seg"]
SCHEMA = os.path.join(REPO, "bundles", "schema", "meta_schema.json")
# small enough for a CPU test, same structure as the defaults
TINY = ["--features", "[4,8,16,32]", "--depth", "3"]
# the zoo's network check with its default arguments, as run from inside a bundle
VERIFY_NET = ["verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]


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
        text=True, encoding="utf-8", errors="replace",
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
        "configs/multi_gpu_evaluate.json",
        "configs/demo.json",
        "configs/logging.conf",
        "docs/README.md",
        "large_files.yml",
        "LICENSE",
    ]:
        assert os.path.isfile(bundle_path(name, part)), part
    assert "Apache License" in open(bundle_path(name, "LICENSE")).read()
    # weights are produced by training, never committed
    tracked = subprocess.run(["git", "ls-files", bundle_path(name, "models")], cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert tracked.returncode == 0, tracked.stderr
    assert tracked.stdout.strip() == ""
    large_files = ConfigParser.load_config_file(bundle_path(name, "large_files.yml"))
    assert large_files == {"large_files": []}  # a template publishes no weights


# The model zoo's CI (ci/verify_bundle.py, mode "full") on a bundle folder, step by step and with
# the same calls and arguments; ci/prepare_schema.py puts the schema in eval/schema.json first.
ZOO_CI = textwrap.dedent(
    """
    import os, sys, torch
    from monai.bundle import ConfigParser, ckpt_export, create_workflow, verify_metadata, verify_net_in_out
    bundle_path = sys.argv[1]
    sys.path = [bundle_path] + sys.path
    large_files = ConfigParser.load_config_file(os.path.join(bundle_path, "large_files.yml"))["large_files"]
    for required in ["configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"]:
        assert os.path.exists(os.path.join(bundle_path, required)), required
    meta_file = os.path.join(bundle_path, "configs/metadata.json")
    metadata = ConfigParser.load_config_file(meta_file)
    assert metadata["version"] in metadata["changelog"]
    verify_metadata(meta_file=meta_file, filepath=os.path.join(bundle_path, "eval/schema.json"))
    config_file = os.path.join(bundle_path, "configs/inference.json")
    workflow = create_workflow(workflow_type="inference", bundle_root=bundle_path, config_file=config_file,
                               logging_file=os.path.join(bundle_path, "configs/logging.conf"), meta_file=meta_file)
    assert workflow.check_properties() == [], workflow.check_properties()
    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, bundle_root=bundle_path)
    ckpt_export(net_id="network_def", filepath=os.path.join(bundle_path, "models/verify_model.ts"),
                ckpt_file=os.path.join(bundle_path, "models", "model.pt"), meta_file=meta_file,
                config_file=config_file, bundle_root=bundle_path)
    if os.path.exists(os.path.join(bundle_path, "models/model.ts")):
        torch.jit.load(os.path.join(bundle_path, "models/model.ts"))
    print("model zoo checks passed:", len(large_files), "large files")
    """
)


def model_zoo_ci(bundle):
    """Run the model zoo's CI steps on the bundle folder ``bundle``; returns the completed process."""
    os.makedirs(os.path.join(bundle, "eval"), exist_ok=True)
    shutil.copyfile(SCHEMA, os.path.join(bundle, "eval", "schema.json"))
    return subprocess.run(
        [sys.executable, "-c", ZOO_CI, str(bundle)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", timeout=600
    )


def copy_bundle(name, destination):
    """The bundle folder as a lab would receive it (without local outputs)."""
    return shutil.copytree(bundle_path(name), destination, ignore=shutil.ignore_patterns("models", "logs", "eval"))


@pytest.mark.parametrize("name", BUNDLES)
def test_model_zoo_ci_checks_pass_with_their_defaults(name, tmp_path):
    """The zoo's CI steps on a copy of the template: weights as the CI makes them when none are published."""
    bundle = copy_bundle(name, tmp_path / name)
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser.read_meta(os.path.join(bundle, "configs", "metadata.json"))
    os.makedirs(os.path.join(bundle, "models"))
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(bundle, "models", "model.pt"))

    result = model_zoo_ci(bundle)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "model zoo checks passed" in result.stdout and "data shape of network is verified with no error" in result.stdout
    assert os.path.isfile(os.path.join(bundle, "models", "verify_model.ts"))


@pytest.mark.parametrize("name", BUNDLES)
def test_documented_commands_run_from_inside_the_bundle_with_default_arguments(name, tmp_path):
    """docs/README.md's checks, exactly as written there (no --n, no network overrides)."""
    bundle = bundle_path(name)
    result = monai_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", "../schema/meta_schema.json", cwd=bundle)
    assert result.returncode == 0, result.stdout
    assert "metadata is verified with no error" in result.stdout
    result = monai_bundle(*VERIFY_NET, cwd=bundle)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "data shape of network is verified with no error" in result.stdout


# A machine where unetpp-pipeline is not installed, as the zoo's CI builds it (it installs only
# metadata.json's requirements): the editable install's import hook and any sys.path entry that
# holds a `pipeline` package are dropped, then the command runs as `python -m` would run it.
WITHOUT_PACKAGE = textwrap.dedent(
    """
    import importlib.util, os, runpy, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "unetpp_pipeline" not in getattr(f, "__module__", "")]
    sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "pipeline", "__init__.py"))]
    assert importlib.util.find_spec("pipeline") is None, "the package is still importable"
    command, sys.argv = sys.argv[1], sys.argv[1:]
    if command == "-m":
        sys.argv = sys.argv[1:]
        sys.path[0] = os.getcwd()
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        exec(compile(command, "<zoo ci>", "exec"))
    """
)


def without_package(*args, cwd):
    """``python <args>`` (``-m module ...`` or ``code argv...``) where ``import pipeline`` finds nothing installed."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGE, *args], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", timeout=600,
    )


def copy_checkout(destination):
    """The package's source and the bundles as a clone has them, without installing anything."""
    shutil.copytree(os.path.join(REPO, "pipeline"), destination / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(os.path.join(REPO, "pyproject.toml"), destination / "pyproject.toml")
    for name in BUNDLES:
        copy_bundle(name, destination / "bundles" / name)
    return destination


@pytest.mark.parametrize("name", BUNDLES)
def test_zoo_check_inside_the_bundle_finds_the_checkout_when_the_package_is_not_installed(name):
    """The reported failure: verify_net_in_out with its defaults, from inside the bundle, without the package installed.

    Without scripts/find_pipeline.py this stops at the first expression using the package
    ("Failed to evaluate ConfigExpression"), because MONAI imports the configs' modules as optional.
    """
    result = without_package("-m", "monai.bundle", *VERIFY_NET, cwd=bundle_path(name))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "data shape of network is verified with no error" in result.stdout


@pytest.mark.parametrize("name", BUNDLES)
def test_zoo_ci_on_a_checkout_without_the_package_installed(name, tmp_path):
    """ci/verify_bundle.py's steps (models_path=bundles, bundle folder first on sys.path) in a clone, nothing installed."""
    checkout = copy_checkout(tmp_path / "clone")
    bundle = os.path.join("bundles", name)
    os.makedirs(os.path.join(checkout, bundle, "eval"))
    shutil.copyfile(SCHEMA, os.path.join(checkout, bundle, "eval", "schema.json"))
    parser = ConfigParser()
    parser.read_config(bundle_path(name, "configs", "inference.json"))
    parser.read_meta(bundle_path(name, "configs", "metadata.json"))
    os.makedirs(os.path.join(checkout, bundle, "models"))
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(checkout, bundle, "models", "model.pt"))

    result = without_package(ZOO_CI, bundle, cwd=checkout)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "model zoo checks passed" in result.stdout and "data shape of network is verified with no error" in result.stdout


def test_a_missing_requirement_of_the_package_is_named_before_monai_fails():
    """Without `ignite` the configs cannot import the package; the output says so, not only MONAI's error."""
    block_ignite = textwrap.dedent(
        """
        import runpy, sys
        class NoIgnite:
            def find_spec(self, name, path=None, target=None):
                if name == "ignite" or name.startswith("ignite."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoIgnite())
        sys.argv = ["monai.bundle", *sys.argv[1:]]
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
        """
    )
    result = without_package(block_ignite, *VERIFY_NET, cwd=bundle_path("unetpp_3d_seg"))
    assert result.returncode != 0
    assert "the unetpp-pipeline package cannot be imported: No module named 'ignite'" in result.stdout, result.stdout[-3000:]


def test_a_bundle_outside_any_checkout_without_the_package_says_what_to_install(tmp_path):
    bundle = copy_bundle("unetpp_3d_seg", tmp_path / "unetpp_3d_seg")
    result = without_package("-m", "monai.bundle", *VERIFY_NET, cwd=bundle)
    assert result.returncode != 0
    assert f"{os.path.realpath(bundle)}: this bundle's code is the unetpp-pipeline package, which is not installed" in result.stdout


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_tells_the_truth_about_the_network(name):
    """spatial_shape is the smallest size multiple the default network accepts, num_channels its channels."""
    meta = json.load(open(bundle_path(name, "configs", "metadata.json")))
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    parser = ConfigParser()
    parser.read_config(bundle_path(name, "configs", "inference.json"))
    depth, dims = parser.get_parsed_content("network_def#depth"), parser.get_parsed_content("spatial_dims")
    multiple = 2 ** (depth + 1)
    assert image["spatial_shape"] == pred["spatial_shape"] == [f"{multiple}*n"] * dims
    assert (image["num_channels"], pred["num_channels"]) == (
        parser.get_parsed_content("in_channels"), parser.get_parsed_content("out_channels")
    )  # fmt: skip
    parser["network_def#features"] = [2] * (depth + 1)  # the size rule depends on the depth only
    network = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        assert network(torch.rand((1, 1) + (multiple,) * dims)).shape[2:] == (multiple,) * dims
        assert network(torch.rand((1, 1) + (multiple + 3,) * dims)).shape[2:] == (multiple + 3,) * dims  # padded
        with pytest.raises(ValueError, match="too small for depth"):
            network(torch.rand((1, 1) + (multiple // 2,) * dims))  # "16*n" would be false at n=1


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_metadata_against_the_schema_in_the_repo(name):
    result = monai_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", SCHEMA, cwd=bundle_path(name))
    assert result.returncode == 0, result.stdout
    assert "metadata is verified with no error" in result.stdout
    meta = json.load(open(bundle_path(name, "configs", "metadata.json")))
    assert any("UNet++" in ref for ref in meta["references"]) and any("U-Net:" in ref for ref in meta["references"])
    # the distribution that provides pipeline.*, by its real name and installed version
    assert meta["required_packages_version"]["unetpp-pipeline"] == importlib.metadata.version("unetpp-pipeline")
    # MONAI Label's label map: class value -> name, background included
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "foreground"}


def test_verify_metadata_rejects_incomplete_metadata(tmp_path):
    meta = json.load(open(bundle_path("unetpp_3d_seg", "configs", "metadata.json")))
    del meta["references"]
    meta["network_data_format"]["inputs"]["image"].pop("channel_def")
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    result = monai_bundle("verify_metadata", "--meta_file", str(tmp_path / "metadata.json"), "--filepath", SCHEMA)
    assert result.returncode != 0
    assert "references" in result.stdout or "channel_def" in result.stdout


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
    assert json.loads(extra["metadata.json"])["version"] == json.load(open(bundle_path(name, "configs", "metadata.json")))["version"]


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
    """As the model zoo's unit tests check a bundle: the workflow with its logging and metadata, data overrides only."""
    flow = ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[bundle_path(name, "configs", c) for c in configs],
        logging_file=bundle_path(name, "configs", "logging.conf"),
        meta_file=bundle_path(name, "configs", "metadata.json"),
        bundle_root=str(tmp_path),
        cache_rate=0.0,
        num_workers=0,
        **small_data[name],
    )
    flow.initialize()
    assert flow.check_properties() == []
    assert flow.bundle_root == str(tmp_path)
    if workflow_type == "train":
        assert type(flow.trainer).__name__ == "SupervisedTrainer" and type(flow.evaluator).__name__ == "SupervisedEvaluator"
        assert len(flow.train_dataset) == 2 and flow.max_epochs > 0
    else:
        assert type(flow.evaluator).__name__ == "SupervisedEvaluator" and len(flow.dataset) == 2


@pytest.mark.parametrize("name", BUNDLES)
def test_a_copied_bundle_without_data_says_what_to_pass(name, tmp_path):
    """Defaults point inside the bundle (data/datalist.json), never into this repository."""
    bundle = copy_bundle(name, tmp_path / name)
    for config in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config(os.path.join(bundle, "configs", config))
        assert parser.get_parsed_content("bundle_root") == "."
        assert parser.get_parsed_content("datalist") == os.path.join(".", "data", "datalist.json")
    result = monai_bundle("run", "--config_file", "configs/train.json", cwd=bundle)
    assert result.returncode != 0 and "no datalist at" in result.stdout and "pass --dataset_dir DIR" in result.stdout
    assert not os.path.exists(os.path.join(bundle, "models"))
    result = monai_bundle("run", "--config_file", "configs/inference.json", cwd=bundle)
    assert result.returncode != 0 and "nothing to segment" in result.stdout and "pass --dataset_dir FOLDER" in result.stdout


def test_inference_without_a_datalist_segments_every_image_in_dataset_dir(small_data, tmp_path):
    from pipeline.settings import inference_inputs

    folder = os.path.join(small_data["unetpp_3d_seg"]["dataset_dir"], "synthetic_3d", "imagesTs")
    found = inference_inputs(os.path.join(folder, "datalist.json"), folder)
    assert [os.path.basename(e["image"]) for e in found] == sorted(os.listdir(folder)) and len(found) == 4
    assert inference_inputs(tmp_path / "none.json", tmp_path / "nowhere") == []


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
def test_multi_gpu_evaluate_overlays_train_and_evaluate(name):
    """The model zoo's order: train.json, evaluate.json, multi_gpu_evaluate.json (run: test_bundle_runs.py)."""
    configs = [bundle_path(name, "configs", c) for c in ("train.json", "evaluate.json", "multi_gpu_evaluate.json")]
    flow = ConfigWorkflow(config_file=configs, logging_file=False, workflow_type="eval")
    assert flow.parser["validate#dataloader#sampler"] == "@validate#sampler"
    assert flow.parser["validate#sampler#_target_"] == "DistributedSampler"
    assert flow.parser["run"] == ["$@validate#evaluator.run()"]
    assert "gloo" in json.dumps(flow.parser["initialize"]) and "@eval_section" in json.dumps(flow.parser["initialize"])


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
    assert type(inferer).__name__ == ("BodySlidingWindowInferer" if name == "unetpp_3d_seg" else "BodySliceInferer")
    assert callable(parser.get_parsed_content("preprocessing"))
    # Windows that reach past the image are padded with the preset's air value, not 0 (= mean tissue
    # after a z-score), in inference and in training's validation alike; presets with a body mask
    # predict background in air far from the body (the synthetic "scale" preset has none).
    for preset, air in (("scale", 0.0), ("mri", -5.0), ("ct", -1.0)):
        parser["preset"] = preset
        parser.parse(reset=True)
        inferer = parser.get_parsed_content("inferer")
        assert inferer.cval == air, preset
        assert (inferer.air is None) if preset == "scale" else (inferer.air.background == air), preset
    train = ConfigParser()
    train.read_config(bundle_path(name, "configs", "train.json"))
    train["bundle_root"], train["preset"] = str(tmp_path), "mri"
    assert train.get_parsed_content("validate#inferer").cval == -5.0
    assert train.get_parsed_content("validate#inferer").air.background == -5.0


@pytest.mark.parametrize("name", BUNDLES)
def test_demo_overlay_only_sets_top_level_ids_of_train_json(name):
    """So configs/demo.json overlays train.json, evaluate.json and inference.json alike."""
    demo = json.load(open(bundle_path(name, "configs", "demo.json")))
    train = json.load(open(bundle_path(name, "configs", "train.json")))
    assert [key for key in demo if key not in train] == []
    assert all("#" not in key for key in demo)


# --------------------------------------------------------------------------------------------
# a trained bundle carries its settings (models/settings.json) and every command reads them
# --------------------------------------------------------------------------------------------

TRAINED = {"features": [4, 8, 16], "depth": 2, "norm": "batch", "preset": "ct", "intensity": {"a_min": -100, "a_max": 300}}


def trained_copy(name, tmp_path, overrides=TRAINED, labels=None):
    """A copy of the bundle as training with ``overrides`` leaves it: models/settings.json and weights."""
    from ignite.engine import Engine

    bundle = copy_bundle(name, tmp_path / name)
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "train.json"))
    parser.update({"bundle_root": bundle, **overrides})
    writer = parser.get_parsed_content("train#handlers#2")  # what training attaches first thing
    assert type(writer).__name__ == "SettingsWriter"
    writer.labels = labels or writer.labels
    writer(Engine(lambda engine, batch: None))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(bundle, "models", "model.pt"))
    return bundle


@pytest.mark.parametrize("name", BUNDLES)
def test_model_zoo_ci_checks_pass_on_a_trained_bundle_with_its_own_settings(name, tmp_path):
    """verify_net_in_out and ckpt_export with their defaults build the trained network (depth 2, widths 4-16)."""
    bundle = trained_copy(name, tmp_path)
    settings = json.load(open(os.path.join(bundle, "models", "settings.json")))
    assert {key: settings[key] for key in TRAINED} == TRAINED
    result = model_zoo_ci(bundle)
    assert result.returncode == 0, result.stdout[-5000:]
    exported = torch.jit.load(os.path.join(bundle, "models", "verify_model.ts"))
    assert exported.features == [4, 8, 16] and exported.depth == 2


def test_evaluate_and_inference_read_the_trained_settings_and_refuse_others(tmp_path):
    from pipeline.settings import SettingsMismatchError

    bundle = trained_copy("unetpp_3d_seg", tmp_path, labels={"0": "background", "1": "spleen"})
    for configs in (["inference.json"], ["train.json", "evaluate.json"]):
        parser = ConfigParser()
        parser.read_config([os.path.join(bundle, "configs", c) for c in configs])
        parser["bundle_root"] = bundle
        assert {key: parser.get_parsed_content(key) for key in TRAINED} == TRAINED
        preprocessing = parser.get_parsed_content("preprocessing" if len(configs) == 1 else "validate#preprocessing")
        assert "NormalizeBodyd" in repr([type(t).__name__ for t in preprocessing.transforms])  # the CT chain
        network = parser.get_parsed_content("network_def")
        loader = parser.get_parsed_content("handlers#0" if len(configs) == 1 else "validate#handlers#0")
        loader.load_path = os.path.join(bundle, "models", "model.pt")
        loader(type("Engine", (), {"state": None, "logger": __import__("logging").getLogger("test")})())
        assert network.features == [4, 8, 16]

        parser.update({"pixdim": [1.5, 1.5, 2.0], "preset": "mri"})  # as --pixdim ... --preset mri would
        parser.parse(reset=True)
        loader = parser.get_parsed_content("handlers#0" if len(configs) == 1 else "validate#handlers#0")
        with pytest.raises(SettingsMismatchError) as refused:
            loader.__call__(type("Engine", (), {"state": None, "logger": None})())
        message = str(refused.value)
        assert "preset: trained 'ct', now 'mri'" in message and "pixdim: trained None, now [1.5, 1.5, 2.0]" in message
        assert "--force True" in message and "features" not in message
        parser["force"] = True
        parser.parse(reset=True)
        forced = parser.get_parsed_content("handlers#0" if len(configs) == 1 else "validate#handlers#0")
        forced(type("Engine", (), {"state": None, "logger": __import__("logging").getLogger("test")})())


def test_batch_segmentation_reads_the_trained_settings_and_class_names(tmp_path):
    from pipeline.segment.bundle import load_bundle
    from pipeline.settings import SettingsMismatchError

    bundle = trained_copy("unetpp_3d_seg", tmp_path, labels={"0": "background", "1": "spleen"})
    loaded = load_bundle(bundle)
    assert {key: loaded.settings[key] for key in TRAINED} == TRAINED
    assert loaded.class_names == {1: "spleen"}
    assert set(loaded.config_sha256) == {os.path.join("configs", "inference.json")}
    with pytest.raises(SettingsMismatchError, match="depth: trained 2, now 3"):
        load_bundle(bundle, overrides={"depth": 3, "features": [4, 8, 16, 32]})
    # --force: the settings check is skipped, the architecture check still speaks
    with pytest.raises(Exception, match="does not fit the network"):
        load_bundle(bundle, overrides={"depth": 3, "features": [4, 8, 16, 32]}, force=True)
    assert load_bundle(bundle, overrides={"preset": "mri", "intensity": None}, force=True).settings["preset"] == "mri"


def test_training_refuses_to_continue_a_run_under_other_settings(tmp_path):
    from ignite.engine import Engine

    from pipeline.settings import SettingsMismatchError, SettingsWriter

    models = tmp_path / "models"
    first = {"preset": "ct", "depth": 2}
    SettingsWriter(models / "settings.json", first)(Engine(lambda e, b: None))
    SettingsWriter(models / "settings.json", dict(first, depth=3))(Engine(lambda e, b: None))  # no run to continue yet
    (models / "latest.pt").write_bytes(b"a training state")
    with pytest.raises(SettingsMismatchError, match="depth: 3 there, 2 now"):
        SettingsWriter(models / "settings.json", first)(Engine(lambda e, b: None))
    SettingsWriter(models / "settings.json", first, resume=False)(Engine(lambda e, b: None))  # --resume False
    assert json.loads((models / "settings.json").read_text()) == first
    SettingsWriter(models / "settings.json", dict(first, preset="mri"), force=True)(Engine(lambda e, b: None))


# --------------------------------------------------------------------------------------------
# test-time augmentation: the `tta` option (default false) of evaluate and inference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("configs,key", [(["train.json", "evaluate.json"], "validate#evaluator"), (["inference.json"], "evaluator")])
def test_tta_option_wraps_the_inferer_in_mirroring_with_the_right_activation(name, configs, key):
    for tta, out_channels, activation in ((False, 1, None), (True, 1, "sigmoid"), (True, 3, "softmax")):
        parser = ConfigParser()
        parser.read_config([bundle_path(name, "configs", c) for c in configs])
        parser.update({"tta": tta, "out_channels": out_channels})
        inferer = parser.get_parsed_content(f"{key}#inferer")
        assert type(inferer).__name__ == "AutocastInferer"
        window = parser.get_parsed_content("validate#inferer" if "evaluate.json" in configs else "inferer")
        if activation is None:
            assert inferer.inferer is window
        else:
            assert type(inferer.inferer).__name__ == "MirrorTTAInferer" and inferer.inferer.activation == activation
            assert inferer.inferer.inferer is window
    # training's own validation never mirrors (tta is an evaluate/inference option)
    parser = ConfigParser()
    parser.read_config(bundle_path(name, "configs", "train.json"))
    assert "tta" not in parser and type(parser.get_parsed_content("validate#evaluator#inferer").inferer).__name__ != "MirrorTTAInferer"


@pytest.mark.parametrize("name", ["unetpp_3d_seg", "unetpp_2d_seg"])
def test_inference_config_builds_the_network_prune_recorded(name, tmp_path):
    """`python -m pipeline prune` records its choice in models/settings.json; inference.json reads it."""
    from pipeline.settings import record_serving

    for recorded, expected in (({"mode": "fast", "prune_level": 2}, ("fast", 2)), ({"mode": "accurate", "head_weights": [0, 1, 3, 0]}, ("accurate", 4))):
        record_serving(tmp_path / "models", recorded)
        parser = ConfigParser()
        parser.read_config(bundle_path(name, "configs", "inference.json"))
        parser["bundle_root"] = str(tmp_path)
        network = parser.get_parsed_content("network_def")
        assert (network.mode, network.prune_level) == expected
        if recorded["mode"] == "accurate":
            assert network.head_weights.tolist() == pytest.approx([0, 0.25, 0.75, 0])


@pytest.mark.parametrize("labels", [{"0": "background", "1": "liver"}, {"background": 0, "liver": 1}])
def test_settings_record_class_names_from_msd_and_nnunet_label_maps(labels, tmp_path):
    from pipeline.settings import datalist_labels

    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"labels": labels, "training": []}))
    assert datalist_labels(path) == {"0": "background", "1": "liver"}
