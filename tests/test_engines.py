"""The small engine parts the bundle configs use (pipeline/engines.py), on real MONAI engines."""

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import EarlyStopHandler, LrScheduleHandler, MeanDice, ValidationHandler, from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.transforms import Compose, Lambdad

from pipeline.engines import (
    BestModelSaver,
    CheckpointMismatchError,
    HausdorffDistance95,
    ResumableCheckpoint,
    TrainingCurves,
    atomic_save,
    bundle_root,
    final_head,
    handlers_for_rank,
    load_weights,
    with_cpu_autocast,
)
from pipeline.losses import BCEDiceLoss, DeepSupervisionLoss
from pipeline.nets import UNetPlusPlus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_atomic_save_keeps_the_old_file_when_a_save_fails(tmp_path):
    path = tmp_path / "latest.pt"
    atomic_save({"epoch": 1, "weights": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"epoch": 2, "weights": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


@pytest.mark.slow
def test_atomic_save_survives_sigkill_during_saves(tmp_path):
    """A process killed at random moments while saving never leaves an unreadable file behind."""
    path = tmp_path / "latest.pt"
    script = textwrap.dedent(
        f"""
        import torch
        from pipeline.engines import atomic_save
        weights = torch.randn(4_000_000)  # 16 MB: a save takes long enough to be interrupted
        step = 0
        while True:
            step += 1
            atomic_save({{"step": step, "weights": weights * 0 + step}}, {str(path)!r})
            print(step, flush=True)
        """
    )
    rng = np.random.default_rng(0)
    last = 0
    for _ in range(2):  # each start imports MONAI: a few seconds
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
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


# --------------------------------------------------------------------------------------------
# resumable training on MONAI engines
# --------------------------------------------------------------------------------------------


def blobs(count, seed):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        label = np.zeros((1, 16, 16), np.float32)
        y, x = rng.integers(3, 13, size=2)
        label[0, y - 3 : y + 3, x - 3 : x + 3] = 1
        image = label + rng.uniform(0, 0.4, label.shape).astype(np.float32)
        items.append({"image": torch.from_numpy(image), "label": torch.from_numpy(label)})
    return items


def build_training(tmp_path, max_epochs, resume=True):
    """A tiny version of the bundle's training wiring, on in-memory data."""
    torch.manual_seed(0)
    net = tiny_net()
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    post = Compose(
        [Lambdad("pred", final_head), Lambdad("pred", lambda p: (p.sigmoid() > 0.5).float())]
    )
    early_stop = EarlyStopHandler(patience=50, score_function=lambda e: e.state.metrics["val_dice"])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(blobs(2, 1), batch_size=1),
        network=net,
        inferer=SlidingWindowInferer(roi_size=(16, 16)),
        postprocessing=post,
        key_val_metric={"val_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
        val_handlers=[early_stop, BestModelSaver(tmp_path / "models", net)],
    )
    checkpoint = ResumableCheckpoint(
        tmp_path / "models",
        {"model": net, "optimizer": optimizer, "lr_scheduler": scheduler},
        validator=evaluator,
        early_stop=early_stop,
        resume=resume,
    )
    curves = TrainingCurves(tmp_path / "logs", validator=evaluator)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(blobs(4, 0), batch_size=2),
        network=net,
        optimizer=optimizer,
        loss_function=DeepSupervisionLoss(BCEDiceLoss()),
        inferer=SimpleInferer(),
        postprocessing=post,
        key_train_metric={"train_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
        train_handlers=handlers_for_rank(
            [ValidationHandler(1, evaluator), LrScheduleHandler(scheduler, print_lr=False), checkpoint, curves]
        ),
    )
    early_stop.set_trainer(trainer)
    return trainer, evaluator, optimizer, scheduler, net


def test_resumable_checkpoint_continues_where_training_stopped(tmp_path):
    trainer, evaluator, optimizer, scheduler, _ = build_training(tmp_path, max_epochs=2)
    trainer.run()
    state = torch.load(tmp_path / "models" / "latest.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 4 and state["lr_scheduler"]["last_epoch"] == 2
    assert set(state) == {"model", "optimizer", "lr_scheduler", "trainer", "validator", "early_stopping"}
    best = (evaluator.state.best_metric, evaluator.state.best_metric_epoch)
    assert (tmp_path / "models" / "model.pt").is_file()

    # a new process would build everything again from the config: same here, with more epochs
    trainer2, evaluator2, optimizer2, scheduler2, net2 = build_training(tmp_path, max_epochs=3)
    epochs_run = []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    trainer2.run()
    assert epochs_run == [3]  # epochs 1 and 2 were not trained again
    assert trainer2.state.iteration == 6 and scheduler2.last_epoch == 3
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert evaluator2.state.best_metric >= best[0]
    assert evaluator2.state.best_metric_epoch in (best[1], 3)
    with open(tmp_path / "logs" / "training_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"loss", "lr", "train_dice", "val_dice"} <= set(rows[0])
    assert (tmp_path / "logs" / "training_curves.png").stat().st_size > 1000


def test_resume_false_starts_from_scratch_and_bad_state_is_reported(tmp_path):
    trainer, *_ = build_training(tmp_path, max_epochs=1)
    trainer.run()
    fresh, *_ = build_training(tmp_path, max_epochs=1, resume=False)
    epochs_run = []
    fresh.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    fresh.run()
    assert epochs_run == [1]

    torch.save({"model": tiny_net(features=(8, 16, 32)).state_dict()}, tmp_path / "models" / "latest.pt")
    other, *_ = build_training(tmp_path, max_epochs=2)
    with pytest.raises(CheckpointMismatchError, match="lacks"):
        other.run()


def test_best_model_is_a_bare_state_dict_that_only_improves(tmp_path):
    trainer, evaluator, *_ = build_training(tmp_path, max_epochs=3)
    saved = []
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saved.append(e.state.best_metric_epoch == e.state.epoch))
    trainer.run()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(state) == set(tiny_net().state_dict())  # what the model zoo expects in models/model.pt
    assert saved[0]  # the first validation is always a new best


# --------------------------------------------------------------------------------------------
# metrics, heads, autocast, bundle root
# --------------------------------------------------------------------------------------------


def test_hausdorff95_is_in_millimetres():
    pred = torch.zeros(1, 20, 20, 20)
    pred[0, 5:10, 5:10, 5:10] = 1
    label = torch.zeros(1, 20, 20, 20)
    label[0, 5:10, 5:10, 8:13] = 1  # shifted by 3 voxels along z

    def hd95(spacing):
        affine = torch.diag(torch.tensor([*spacing, 1.0]))
        metric = HausdorffDistance95(include_background=True)
        metric.update(([MetaTensor(pred, affine=affine)], [MetaTensor(label, affine=affine)]))
        return float(metric.metric_fn.aggregate())

    assert hd95((1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95((1.0, 1.0, 2.5)) == pytest.approx(7.5)


def test_final_head_picks_the_deepest_head():
    net = tiny_net().train()
    heads = net(torch.rand(2, 1, 16, 16))
    assert final_head(heads) is heads[0]
    single = torch.rand(1, 1, 4, 4)
    assert final_head(single) is single


def test_cpu_bf16_autocast_returns_float32_close_to_float32():
    net = tiny_net().eval()
    x = torch.rand(1, 1, 32, 32)
    plain = SimpleInferer()
    assert with_cpu_autocast(plain, False) is plain
    with torch.no_grad():
        reference = plain(x, net)
        bf16 = with_cpu_autocast(plain, True)(x, net)
    assert bf16.dtype == torch.float32
    assert torch.allclose(bf16, reference, atol=0.1, rtol=0.1)


def test_bundle_root_is_the_bundle_of_the_config_being_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere
    config = os.path.join(REPO, "bundles", "unetpp_3d_seg", "configs", "inference.json")
    workflow = ConfigWorkflow(config_file=config, workflow_type="infer", logging_file=False)
    workflow.initialize()
    assert workflow.bundle_root == os.path.join(REPO, "bundles", "unetpp_3d_seg")
    assert bundle_root(default=tmp_path) == str(tmp_path)  # outside a ConfigWorkflow
