"""Checkpoint files: saved atomically (pipeline.fileio), loaded with clear errors (pipeline.checkpoints)."""

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from pipeline.checkpoints import CheckpointMismatchError, load_checkpoint, load_weights
from pipeline.fileio import atomic_torch_save
from pipeline.nets import UNetPlusPlus


def tiny_net(**kwargs):
    settings = dict(spatial_dims=2, in_channels=1, out_channels=1, features=(4, 8, 16), depth=2)
    settings.update(kwargs)
    return UNetPlusPlus(**settings)


# --------------------------------------------------------------------------------------------
# atomic saving
# --------------------------------------------------------------------------------------------


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_atomic_torch_save_keeps_the_old_file_when_a_save_fails(tmp_path):
    path = tmp_path / "latest.pt"
    atomic_torch_save({"epoch": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"epoch": 2, "weights": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


@pytest.mark.slow
def test_atomic_torch_save_survives_sigkill_during_saves(tmp_path):
    """A process killed at random moments while saving never leaves an unreadable file behind."""
    path = tmp_path / "latest.pt"
    script = textwrap.dedent(
        f"""
        import torch
        from pipeline.fileio import atomic_torch_save
        weights = torch.randn(4_000_000)  # 16 MB: a save takes long enough to be interrupted
        step = 0
        while True:
            step += 1
            atomic_torch_save({{"step": step, "weights": weights * 0 + step}}, {str(path)!r})
            print(step, flush=True)
        """
    )
    rng = np.random.default_rng(0)
    last = 0
    for _ in range(2):  # each start imports torch: a few seconds
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
        process.stdout.readline()  # at least one complete save
        time.sleep(float(rng.uniform(0.0, 0.4)))
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = torch.load(path, weights_only=True)
        assert state["step"] >= 1 and torch.all(state["weights"] == state["step"])
        last = state["step"]
    assert last >= 1


# --------------------------------------------------------------------------------------------
# loading weights
# --------------------------------------------------------------------------------------------


def test_load_weights_round_trip_and_training_checkpoints(tmp_path):
    source, target = tiny_net(), tiny_net()
    torch.save(source.state_dict(), tmp_path / "model.pt")
    load_weights(target, tmp_path / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    # latest.pt style: {"model": state_dict, "optimizer": ...}
    torch.save({"model": source.state_dict(), "optimizer": {"state": {}}}, tmp_path / "latest.pt")
    from_training = load_weights(tiny_net(), tmp_path / "latest.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), from_training.state_dict().values()))


def test_load_weights_wrong_architecture_names_the_difference(tmp_path):
    torch.save(tiny_net(features=(8, 16, 32)).state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(tiny_net(), tmp_path / "model.pt")
    message = str(info.value)
    assert "does not fit the network UNetPlusPlus(" in message and "features=[4, 8, 16]" in message
    assert "differ in shape" in message and "--network_def#features" in message

    torch.save(tiny_net(depth=1).state_dict(), tmp_path / "shallow.pt")
    with pytest.raises(CheckpointMismatchError, match="missing from it"):
        load_weights(tiny_net(), tmp_path / "shallow.pt")


def test_load_weights_refuses_pickled_objects_and_missing_files(tmp_path):
    torch.save({"network": tiny_net()}, tmp_path / "pickled.pt")  # a whole module, not a state_dict
    with pytest.raises(CheckpointMismatchError, match="weights_only=True"):
        load_weights(tiny_net(), tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="train the bundle first"):
        load_weights(tiny_net(), tmp_path / "absent.pt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    atomic_torch_save({"weights": torch.ones(1000)}, tmp_path / "latest.pt")
    data = (tmp_path / "latest.pt").read_bytes()
    (tmp_path / "latest.pt").write_bytes(data[: len(data) // 2])  # what a non-atomic save killed midway leaves
    with pytest.raises(CheckpointMismatchError, match="latest.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "latest.pt")
