"""The handlers the bundle configs use (pipeline/handlers.py), on real MONAI engines."""

import csv
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, MeanDice, ValidationHandler, from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.transforms import Compose, Lambdad

from pipeline.checkpoints import CheckpointMismatchError
from pipeline.handlers import (
    BestModelSaver,
    HausdorffDistance95,
    ResumableCheckpoint,
    ResumableEarlyStop,
    TrainingCurves,
    final_head,
    handlers_for_rank,
)
from pipeline.losses import BCEDiceLoss, DeepSupervisionLoss
from pipeline.nets import UNetPlusPlus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_net(**kwargs):
    settings = dict(spatial_dims=2, in_channels=1, out_channels=1, features=(4, 8, 16), depth=2)
    settings.update(kwargs)
    return UNetPlusPlus(**settings)


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


def build_training(tmp_path, max_epochs, resume=True, patience=50):
    """A tiny version of the bundle's training wiring, on in-memory data."""
    torch.manual_seed(0)
    net = tiny_net()
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    post = Compose(
        [Lambdad("pred", final_head), Lambdad("pred", lambda p: (p.sigmoid() > 0.5).float())]
    )
    early_stop = ResumableEarlyStop(patience=patience, score_function=lambda e: e.state.metrics["val_dice"])
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
        {"model": net, "optimizer": optimizer, "lr_scheduler": scheduler, "early_stopping": early_stop},
        validator=evaluator,
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
    return trainer, evaluator, optimizer, scheduler, early_stop


def test_resumable_checkpoint_continues_where_training_stopped(tmp_path):
    trainer, evaluator, optimizer, scheduler, early_stop = build_training(tmp_path, max_epochs=2)
    trainer.run()
    state = torch.load(tmp_path / "models" / "latest.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 4 and state["lr_scheduler"]["last_epoch"] == 2
    assert set(state) == {"model", "optimizer", "lr_scheduler", "trainer", "validator", "early_stopping"}
    assert state["early_stopping"] == early_stop.state_dict() and state["early_stopping"]["best_score"] > 0
    best = (evaluator.state.best_metric, evaluator.state.best_metric_epoch)
    assert (tmp_path / "models" / "model.pt").is_file()

    # a new process would build everything again from the config: same here, with more epochs
    trainer2, evaluator2, optimizer2, scheduler2, early_stop2 = build_training(tmp_path, max_epochs=3)
    epochs_run, early_stop_at_start = [], []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: early_stop_at_start.append(early_stop2.state_dict()))
    trainer2.run()
    assert epochs_run == [3]  # epochs 1 and 2 were not trained again
    assert early_stop_at_start == [state["early_stopping"]]  # counter and best score carried over
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


def test_early_stop_counter_survives_a_restart():
    def run(max_epochs=10, resume_from=None):
        trainer, evaluator = Engine(lambda engine, batch: None), Engine(lambda engine, batch: None)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
        early_stop = ResumableEarlyStop(patience=3, score_function=lambda _: 0.5)  # never improves
        early_stop.attach(evaluator)
        early_stop.set_trainer(trainer)
        if resume_from is not None:
            early_stop.load_state_dict(resume_from)
        trainer.run([0], max_epochs=max_epochs)
        return trainer.state.epoch, early_stop.state_dict()

    assert run()[0] == 4  # the first score is the best so far, then 3 without improvement
    epochs, state = run(max_epochs=2)
    assert epochs == 2 and (state["counter"], state["best_score"]) == (1, 0.5)
    assert run(resume_from=state)[0] == 2  # 2 more validations without improvement, not 3


def test_early_stop_without_trainer_says_what_to_call():
    early_stop = ResumableEarlyStop(patience=3, score_function=lambda _: 0.5)
    with pytest.raises(RuntimeError, match="set_trainer"):
        early_stop.state_dict()


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
