"""End to end: both bundles through ``python -m monai.bundle run`` (and ``torchrun``) on the demo data.

Tiny networks, one to four epochs, two cases per split: each run takes seconds, but the file
still takes a couple of minutes on two cores, hence ``slow`` (they run in CI all the same).
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.demo_data import write_demo_data
from pipeline.nets import UNetPlusPlus

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "unetpp_3d_seg": [
        "--features", "[4,8,16]", "--depth", "2",
        "--roi_size", "[32,32,32]", "--sw_roi_size", "[64,64,64]", "--num_samples", "2",
    ],
    "unetpp_2d_seg": [
        "--features", "[4,8,16]", "--depth", "2",
        "--roi_size", "[64,64]", "--sw_roi_size", "[128,128]", "--num_samples", "2",
    ],
}  # fmt: skip
DATA_SET = {"unetpp_3d_seg": "synthetic_3d", "unetpp_2d_seg": "synthetic_2d"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data and small datalists: {bundle: (dataset_dir, datalist path)}."""
    root = tmp_path_factory.mktemp("demo_data")
    write_demo_data(root, sets=("synthetic_3d", "synthetic_2d"))
    lists = {}
    for bundle, name in DATA_SET.items():
        content = json.loads((root / f"{name}.json").read_text())
        for section, count in (("training", 4), ("validation", 2), ("test", 2)):
            content[section] = content[section][:count]
        path = root / f"{name}_small.json"
        path.write_text(json.dumps(content))
        lists[bundle] = (root, path)
    return lists


def configs(bundle, *names):
    return "[" + ",".join(f"'{os.path.join(REPO, 'bundles', bundle, 'configs', n)}'" for n in names) + "]"


def command(bundle, config_names, demo, root, *extra, launcher=(sys.executable, "-m")):
    dataset_dir, datalist = demo[bundle]
    return [
        *launcher, "monai.bundle", "run", "--config_file", configs(bundle, *config_names),
        "--dataset_dir", str(dataset_dir), "--datalist", str(datalist), "--bundle_root", str(root),
        "--progress_bar", "False", *TINY[bundle], *extra,
    ]  # fmt: skip


# OpenMP threads that sleep while waiting: on a CPU shared with other jobs spinning ones slow runs down a lot
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")


def run(args, timeout=300):
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", timeout=timeout, env=ENV)
    return result.returncode, result.stdout


def log_rows(root):
    with open(root / "logs" / "training_log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.parametrize("bundle", ["unetpp_3d_seg", "unetpp_2d_seg"])
def test_train_evaluate_infer(bundle, demo, tmp_path):
    train = ["train.json", "demo.json"]
    code, out = run(command(bundle, train, demo, tmp_path, "--max_epochs", "1", "--val_interval", "1"))
    assert code == 0, out[-3000:]
    models = tmp_path / "models"
    assert set(torch.load(models / "model.pt", weights_only=True)) == set(
        UNetPlusPlus(2 if "2d" in bundle else 3, 1, 1, features=(4, 8, 16), depth=2, norm="batch").state_dict()
    )
    assert torch.load(models / "latest.pt", weights_only=True)["trainer"]["iteration"] >= 1
    rows = log_rows(tmp_path)
    assert [r["epoch"] for r in rows] == ["1"] and {"loss", "lr", "val_mean_dice", "val_mean_iou", "val_hd95"} <= set(rows[0])
    assert (tmp_path / "logs" / "training_curves.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").iterdir())

    # evaluate: per-case and per-class CSVs plus summaries, on the test section
    code, out = run(command(bundle, [*train, "evaluate.json"], demo, tmp_path))
    assert code == 0, out[-3000:]
    evaluation = tmp_path / "eval"
    summary = dict(read_csv(evaluation / "metrics.csv"))
    assert set(summary) == {"val_mean_dice", "val_mean_iou", "val_hd95"}
    assert 0.0 <= float(summary["val_mean_dice"]) <= 1.0
    for metric in summary:
        per_case = read_csv(evaluation / f"{metric}_raw.csv")
        assert per_case[0] == ["filename", "class0", "mean"] and len(per_case) == 1 + 2
        assert all("imagesTs" in row[0] for row in per_case[1:])
        assert read_csv(evaluation / f"{metric}_summary.csv")[1][0] == "class0"

    # inference: one mask per test image, on the image's own grid (half of them are stored LPS)
    code, out = run(command(bundle, ["inference.json", "demo.json"], demo, tmp_path))
    assert code == 0, out[-3000:]
    dataset_dir, datalist = demo[bundle]
    images = [dataset_dir / e["image"] for e in json.loads(datalist.read_text())["test"]]
    for image_path in images:
        mask_path = evaluation / "masks" / image_path.name.replace(".nii.gz", "_seg.nii.gz")
        image, mask = nib.load(image_path), nib.load(mask_path)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

    # fast mode (pruned L1 network) with bf16 autocast on CPU, from the same weights
    fast = ["--network_def#mode", "fast", "--network_def#prune_level", "1", "--cpu_bf16", "True"]
    code, out = run(command(bundle, ["inference.json", "demo.json"], demo, tmp_path, "--output_dir", str(tmp_path / "fast"), *fast))
    assert code == 0, out[-3000:]
    assert len(list((tmp_path / "fast").glob("*_seg.nii.gz"))) == len(images)
    code, out = run(command(bundle, [*train, "evaluate.json"], demo, tmp_path, "--output_dir", str(tmp_path / "fast_eval"), *fast[:4]))
    assert code == 0, out[-3000:]
    assert (tmp_path / "fast_eval" / "val_mean_dice_raw.csv").is_file()


def test_a_trained_bundle_copied_anywhere_runs_every_command_from_inside_it_without_overrides(demo, tmp_path):
    """Train once with overrides; afterwards no command repeats them, from a folder outside the repository."""
    from pipeline import segment

    bundle = tmp_path / "lab" / "my_bundle"
    shutil.copytree(os.path.join(REPO, "bundles", "unetpp_3d_seg"), bundle, ignore=shutil.ignore_patterns("models", "logs", "eval"))
    assert os.path.commonpath([str(bundle), REPO]) != REPO
    dataset_dir, datalist = demo["unetpp_3d_seg"]
    data = ["--dataset_dir", str(dataset_dir), "--datalist", str(datalist)]
    trained = [*TINY["unetpp_3d_seg"], "--norm", "batch", "--preset", "ct", "--intensity", "{'a_min': -1, 'a_max': 2}"]

    def bundle_run(*args):
        result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=bundle, env=ENV, timeout=300,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:]
        return result.stdout

    bundle_run("run", "--config_file", "configs/train.json", *data, *trained, "--max_epochs", "1", "--val_interval", "1",
               "--progress_bar", "False", "--num_workers", "0")  # fmt: skip
    settings = json.loads((bundle / "models" / "settings.json").read_text())
    assert (settings["preset"], settings["depth"], settings["norm"]) == ("ct", 2, "batch")
    assert settings["labels"] == {"0": "background", "1": "foreground"}

    bundle_run("run", "--config_file", "['configs/train.json','configs/evaluate.json']", *data)
    assert float(dict(read_csv(bundle / "eval" / "metrics.csv"))["val_mean_dice"]) >= 0.0
    images = sorted((dataset_dir / "synthetic_3d" / "imagesTs").glob("*.nii.gz"))
    bundle_run("run", "--config_file", "configs/inference.json", "--dataset_dir", str(images[0].parent))
    assert sorted(p.name for p in (bundle / "eval" / "masks").iterdir()) == [i.name.replace(".nii.gz", "_seg.nii.gz") for i in images]
    bundle_run("ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
               "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json")  # fmt: skip
    bundle_run("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json")
    assert torch.jit.load(str(bundle / "models" / "model.ts")).depth == 2

    # segment: no override reproduces training's settings; the explicit-override path gives the same masks
    inputs = images[0].parent
    assert segment.main(["--bundle", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "auto"), "--quiet"]) == 0
    explicit = [f"--override={k}={v}" for k, v in (("features", "[4,8,16]"), ("depth", "2"), ("norm", "batch"), ("preset", "ct"),
                                                   ("intensity", '{"a_min": -1, "a_max": 2}'), ("roi_size", "[32,32,32]"))]  # fmt: skip
    assert segment.main(["--bundle", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "explicit"), "--quiet", *explicit]) == 0
    for image in images:
        mask = image.name.replace(".nii.gz", "_seg.nii.gz")
        auto, by_hand = nib.load(tmp_path / "auto" / mask), nib.load(tmp_path / "explicit" / mask)
        np.testing.assert_array_equal(np.asarray(auto.dataobj), np.asarray(by_hand.dataobj))
        np.testing.assert_array_equal(np.asarray(auto.dataobj), np.asarray(nib.load(bundle / "eval" / "masks" / mask).dataobj))
    # an override that contradicts the trained settings is refused unless --force
    assert segment.main(["--bundle", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "mri"), "--quiet",
                         "--override", "preset=mri", "--override", "intensity=null"]) == 2  # fmt: skip

    # resume after a config edit: the earlier masks were made by another config, so they are not kept silently
    inference = bundle / "configs" / "inference.json"
    inference.write_text(inference.read_text().replace('"overlap": 0.5', '"overlap": 0.25'))
    assert segment.main(["--bundle", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "auto"), "--quiet"]) == 1
    rows = json.loads((tmp_path / "auto" / "summary.json").read_text())["cases"]
    assert all("other settings (config)" in row["reason"] for row in rows), rows
    assert segment.main(["--bundle", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "auto"), "--quiet", "--overwrite"]) == 0
    rows = json.loads((tmp_path / "auto" / "summary.json").read_text())["cases"]
    assert {row["status"] for row in rows} == {"done"}


def test_invalid_datalist_stops_before_training(demo, tmp_path):
    dataset_dir, datalist = demo["unetpp_3d_seg"]
    content = json.loads(datalist.read_text())
    content["training"][1]["label"] = "synthetic_3d/labelsTr/no_such_case.nii.gz"
    content["validation"][0]["image"] = content["validation"][0]["label"] = "../outside.nii.gz"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    code, out = run(command("unetpp_3d_seg", ["train.json", "demo.json"], demo, tmp_path, "--datalist", str(bad)))
    assert code != 0
    assert "DataError" in out and "problem(s)" in out
    assert "no_such_case.nii.gz" in out and "outside dataset_dir" in out  # every problem, each naming its file
    assert "Epoch" not in out and not (tmp_path / "models").exists()


def test_checkpoint_of_another_architecture_is_a_clear_error(demo, tmp_path):
    (tmp_path / "models").mkdir()
    other = UNetPlusPlus(3, 1, 1, features=(8, 16, 32), depth=2, norm="batch")  # demo.json uses batch norm
    torch.save(other.state_dict(), tmp_path / "models" / "model.pt")
    for names in (["train.json", "demo.json", "evaluate.json"], ["inference.json", "demo.json"]):
        code, out = run(command("unetpp_3d_seg", names, demo, tmp_path))
        assert code != 0
        assert "CheckpointMismatchError" in out and "does not fit the network UNetPlusPlus(" in out
        assert "(8, 1, 3, 3, 3) in the checkpoint vs (4, 1, 3, 3, 3) in the network" in out


def test_training_killed_with_sigkill_resumes_from_the_latest_checkpoint(demo, tmp_path):
    args = command("unetpp_3d_seg", ["train.json", "demo.json"], demo, tmp_path, "--max_epochs", "4", "--val_interval", "1")
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (tmp_path / "logs" / "training_log.csv").is_file() and log_rows(tmp_path):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    killed_at = torch.load(tmp_path / "models" / "latest.pt", weights_only=True)
    epoch_length = killed_at["trainer"]["epoch_length"]
    done = killed_at["trainer"]["iteration"] // epoch_length
    assert 1 <= done < 4, "the first run should have been killed mid-training"

    code, out = run(args)
    assert code == 0, out[-3000:]
    assert f"Resumed from {tmp_path / 'models' / 'latest.pt'}: epoch {done}" in out
    assert f"Epoch {done}/4:" not in out and "Epoch 4/4:" in out  # only the remaining epochs ran
    final = torch.load(tmp_path / "models" / "latest.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4 * epoch_length
    assert final["lr_scheduler"]["last_epoch"] == 4
    assert final["optimizer"]["state"]  # Adam moments carried over, not reset
    assert final["validator"]["best_metric_epoch"] >= 1
    assert [r["epoch"] for r in log_rows(tmp_path)] == ["1", "2", "3", "4"]


def test_torchrun_two_cpu_processes(demo, tmp_path):
    args = command(
        "unetpp_3d_seg", ["train.json", "demo.json", "multi_gpu_train.json"], demo, tmp_path,
        "--max_epochs", "2", "--val_interval", "1", "--cpu_bf16", "True",  # DDP with bfloat16 autocast on CPU
        launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"),
    )  # fmt: skip
    code, out = run(args)
    assert code == 0, out[-3000:]
    state = torch.load(tmp_path / "models" / "latest.pt", weights_only=True)
    # 4 training volumes, batch 2: 2 iterations per epoch alone, 1 per rank with DistributedSampler
    assert (state["trainer"]["epoch_length"], state["trainer"]["iteration"]) == (1, 2), out[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert [r["epoch"] for r in log_rows(tmp_path)] == ["1", "2"], out[-3000:]  # written by rank 0 only
    assert out.count("Epoch 2/2:") == 1, out[-3000:]

    # evaluation sharded over the two processes: every test case is measured once, rank 0 writes
    code, out = run(command(
        "unetpp_3d_seg", ["train.json", "demo.json", "evaluate.json", "multi_gpu_evaluate.json"], demo, tmp_path,
        launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"),
    ))  # fmt: skip
    assert code == 0, out[-3000:]
    per_case = read_csv(tmp_path / "eval" / "val_mean_dice_raw.csv")
    _, datalist = demo["unetpp_3d_seg"]
    tests = [os.path.basename(e["image"]) for e in json.loads(datalist.read_text())["test"]]
    assert sorted(os.path.basename(row[0]) for row in per_case[1:]) == sorted(tests), per_case
    assert 0.0 <= float(dict(read_csv(tmp_path / "eval" / "metrics.csv"))["val_mean_dice"]) <= 1.0


def test_mlflow_tracking(demo, tmp_path):
    pytest.importorskip("mlflow")
    args = command("unetpp_3d_seg", ["train.json", "demo.json"], demo, tmp_path, "--max_epochs", "1", "--tracking", "mlflow")
    args += ["--output_dir", str(tmp_path / "logs")]
    code, out = run(args)
    assert code == 0, out[-3000:]
    assert (tmp_path / "logs" / "mlruns.db").is_file()
