"""Ignite/MONAI handlers the bundle configs use where MONAI has no ready one.

Everything else in ``bundles/*/configs`` is plain MONAI (``SupervisedTrainer``,
``SupervisedEvaluator``, ``ValidationHandler``, ``StatsHandler``, ...). Each class here is a
MONAI-style handler (``attach(engine)``):

* :class:`ResumableCheckpoint`, :class:`BestModelSaver` -- checkpoints that survive a ``SIGKILL``
  at any moment. MONAI's ``CheckpointSaver`` builds ignite's ``DiskSaver`` with ``atomic=False``
  and ignite's ``Checkpoint`` deletes the previous file *before* writing the next one, so a kill
  during a save can leave ``model.pt`` truncated or no checkpoint at all. Here every file is
  written with :func:`pipeline.fileio.atomic_torch_save`, and the training state (epoch,
  iteration, model, optimizer, scheduler, AMP scaler, best metric, early-stopping counter) is one
  file, ``latest.pt``, that training resumes from.
* :class:`ResumableEarlyStop` -- early stopping whose counter is part of that state.
* :class:`TrainingCurves` -- per-epoch ``training_log.csv`` and ``training_curves.png``.
* :class:`HausdorffDistance95` -- HD95 in millimetres (MONAI's handler cannot pass the spacing).
* :class:`ProgressBar`, :func:`handlers_for_rank` -- a tqdm bar, and dropping output-only
  handlers on DDP ranks other than 0.

And a helper the configs call: :func:`final_head` (the final head of a deep-supervision output,
for train metrics).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from monai.data import MetaTensor
from monai.handlers import HausdorffDistance, StatsHandler, TensorBoardStatsHandler

from pipeline.checkpoints import CheckpointMismatchError, check_fit, load_checkpoint, unwrap
from pipeline.fileio import atomic_torch_save, atomic_write, atomic_write_text, remove_stale_tmp

__all__ = [
    "rank",
    "final_head",
    "BestModelSaver",
    "ResumableEarlyStop",
    "ResumableCheckpoint",
    "TrainingCurves",
    "HausdorffDistance95",
    "ProgressBar",
    "handlers_for_rank",
]


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def final_head(pred: Any) -> Any:
    """The final (deepest) head of a deep-supervision output, which ``UNetPlusPlus`` returns first.

    For train metrics: in training mode the network returns a list of heads; a single tensor
    (no deep supervision, or eval mode) is returned unchanged.
    """
    return pred[0] if isinstance(pred, (list, tuple)) else pred


# --------------------------------------------------------------------------------------------
# checkpoints and early stopping
# --------------------------------------------------------------------------------------------


class BestModelSaver:
    """Evaluator handler: write the network's state_dict to ``<save_dir>/<filename>`` on a new best.

    MONAI's workflow keeps ``best_metric`` / ``best_metric_epoch`` in the evaluator's state (they are
    part of :class:`ResumableCheckpoint`, so a resumed run does not replace a better model with a
    worse one). The file is the bare state_dict the MONAI model zoo expects in ``models/model.pt``.
    Only rank 0 writes.
    """

    def __init__(self, save_dir: str | os.PathLike, network: torch.nn.Module, filename: str = "model.pt"):
        self.path = Path(save_dir) / filename
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if rank() != 0 or engine.state.best_metric_epoch != engine.state.epoch:
            return
        remove_stale_tmp(self.path)
        atomic_torch_save(unwrap(self.network).state_dict(), self.path)
        name = getattr(engine.state, "key_metric_name", "key metric")
        engine.logger.info(f"New best {name} {engine.state.best_metric:.4f} at epoch {engine.state.epoch}: saved {self.path}")


class _BestMetricState:
    """state_dict view of an evaluator's best metric and its epoch."""

    def __init__(self, evaluator: Engine):
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


class ResumableEarlyStop:
    """Evaluator handler: stop the trainer after ``patience`` validations without a better score.

    ignite's ``EarlyStopping`` does the counting (a score counts as better when it is higher); this
    handler creates and owns it, attaches like a MONAI handler (after every evaluator run) and
    exposes its counter and best score as a public ``state_dict``, so that
    :class:`ResumableCheckpoint` keeps them across restarts (MONAI's ``EarlyStopHandler`` keeps its
    ignite handler private). The trainer is known only after the evaluator is built (the trainer
    runs the evaluator), hence :meth:`set_trainer`, called from the config's ``initialize``.

    Args:
        patience: validations without improvement before the trainer is stopped.
        score_function: ``evaluator -> float``, e.g. ``lambda e: e.state.metrics["val_mean_dice"]``.
        trainer: the engine to stop, or ``None`` and :meth:`set_trainer` before the run.
    """

    def __init__(self, patience: int, score_function: Callable[[Engine], float], trainer: Engine | None = None):
        self.patience = patience
        self.score_function = score_function
        self.stopper: EarlyStopping | None = None
        if trainer is not None:
            self.set_trainer(trainer)

    def set_trainer(self, trainer: Engine) -> None:
        self.stopper = EarlyStopping(patience=self.patience, score_function=self.score_function, trainer=trainer)

    def _require_stopper(self) -> EarlyStopping:
        if self.stopper is None:
            raise RuntimeError("early stopping has no trainer yet: call set_trainer() in the config's 'initialize'")
        return self.stopper

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self._require_stopper()(engine)

    def state_dict(self) -> dict:
        """``{"counter": int, "best_score": float | None, ...}`` as plain Python values (for ``weights_only`` loading)."""
        state = self._require_stopper().state_dict()
        return {key: value.item() if hasattr(value, "item") else value for key, value in state.items()}

    def load_state_dict(self, state: Mapping) -> None:
        self._require_stopper().load_state_dict(dict(state))


class ResumableCheckpoint:
    """Trainer handler: save the whole training state atomically and resume from it on start.

    At the end of every ``save_interval`` epochs (attach it after ``ValidationHandler`` and
    ``LrScheduleHandler`` so that their results are included) rank 0 writes ``<save_dir>/<filename>``
    holding ``save_dict``'s state_dicts (e.g. model, optimizer, lr_scheduler, early stopping), the
    trainer's ignite state (epoch, iteration), the AMP grad scaler and the validator's best metric
    and epoch. When the trainer starts and the file exists (and ``resume`` is true), every rank
    loads it with ``weights_only=True`` and training continues with the next epoch. The
    ``max_epochs`` of the new run wins, so a finished run can be extended.

    Args:
        save_dir: folder of the checkpoint (``models/``).
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler,
            early stopping); a DDP model is unwrapped.
        validator: the ``SupervisedEvaluator`` whose best metric to keep across restarts.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        validator: Engine | None = None,
        filename: str = "latest.pt",
        save_interval: int = 1,
        resume: bool = True,
        map_location: Any = None,
    ):
        if save_interval < 1:
            raise ValueError(f"save_interval must be at least 1, got {save_interval}")
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.validator = validator
        self.save_interval = save_interval
        self.resume = resume
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)

    def _objects(self, engine: Engine) -> dict:
        objects = {key: unwrap(value) for key, value in self.save_dict.items()}
        objects["trainer"] = engine
        if getattr(engine, "scaler", None) is not None:
            objects["grad_scaler"] = engine.scaler
        if self.validator is not None:
            objects["validator"] = _BestMetricState(self.validator)
        return objects

    def save(self, engine: Engine) -> None:
        if rank() != 0:
            return
        remove_stale_tmp(self.path)  # a save killed mid-write leaves its temporary behind
        atomic_torch_save({key: obj.state_dict() for key, obj in self._objects(engine).items()}, self.path)
        engine.logger.info(f"Saved training state at epoch {engine.state.epoch}: {self.path}")

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            engine.logger.info(f"No training state at {self.path}: starting from scratch")
            return
        location = self.map_location if self.map_location is not None else getattr(engine.state, "device", "cpu")
        state = load_checkpoint(self.path, location)
        objects = self._objects(engine)
        if "grad_scaler" in objects and "grad_scaler" not in state:  # resumed on CUDA from a CPU run
            objects.pop("grad_scaler")
        missing = [key for key in objects if key not in state]
        if missing:
            raise CheckpointMismatchError(
                f"{self.path} lacks {missing}: it was not written by this training config. "
                "Move it away, or pass --resume false to start from scratch."
            )
        for key, obj in objects.items():
            if isinstance(obj, torch.nn.Module):
                check_fit(state[key], obj, f"{self.path} ['{key}']")
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        for key, obj in objects.items():
            obj.load_state_dict(state[key])
        epoch = engine.state.iteration // engine.state.epoch_length
        if max_epochs is not None and epoch > max_epochs:
            raise ValueError(
                f"{self.path} is at epoch {epoch}, beyond max_epochs={max_epochs}: raise --max_epochs to train "
                "further, or pass --resume false to start from scratch"
            )
        # The epoch count comes from the checkpoint; the run's own length settings stay.
        engine.state.epoch, engine.state.max_epochs = epoch, max_epochs
        if epoch_length is not None:
            engine.state.epoch_length = epoch_length
        message = f"Resumed from {self.path}: epoch {epoch}, iteration {engine.state.iteration}"
        if self.validator is not None and self.validator.state.best_metric_epoch > 0:
            message += f", best metric {self.validator.state.best_metric:.4f} at epoch {self.validator.state.best_metric_epoch}"
        engine.logger.info(message)


# --------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------


class TrainingCurves:
    """Trainer handler: one row per epoch in ``training_log.csv`` and a ``training_curves.png``.

    A row holds the epoch's mean loss, the learning rate, the trainer's metrics and, for epochs
    with a validation, the validator's metrics. On a resumed run the rows after the resumed epoch
    are dropped (attach it after :class:`ResumableCheckpoint`). Each epoch is also logged in one line.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        validator: Engine | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        loss_transform: Callable = lambda output: output[0]["loss"] if isinstance(output, list) else output["loss"],
        csv_name: str = "training_log.csv",
        png_name: str = "training_curves.png",
    ):
        self.output_dir = Path(output_dir)
        self.validator = validator
        self.optimizer = optimizer
        self.loss_transform = loss_transform
        self.csv_path = self.output_dir / csv_name
        self.png_path = self.output_dir / png_name
        self.rows: list[dict] = []
        self._loss_sum, self._loss_count = 0.0, 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _started(self, engine: Engine) -> None:
        self.rows = []
        if engine.state.epoch > 0 and self.csv_path.is_file():
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                self.rows = [
                    {k: float(v) for k, v in row.items() if v not in ("", None)}
                    for row in csv.DictReader(handle)
                    if int(float(row["epoch"])) <= engine.state.epoch
                ]

    def _epoch_started(self, engine: Engine) -> None:
        self._loss_sum, self._loss_count = 0.0, 0

    def _iteration_completed(self, engine: Engine) -> None:
        loss = self.loss_transform(engine.state.output)
        self._loss_sum += float(loss)
        self._loss_count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        row = {"epoch": float(epoch), "loss": self._loss_sum / max(self._loss_count, 1)}
        optimizer = self.optimizer if self.optimizer is not None else getattr(engine, "optimizer", None)
        if optimizer is not None:
            row["lr"] = float(optimizer.param_groups[0]["lr"])
        row.update({k: float(v) for k, v in engine.state.metrics.items() if _is_number(v)})
        validator = self.validator
        if validator is not None and validator.state.epoch == epoch and validator.state.iteration > 0:
            row.update({k: float(v) for k, v in validator.state.metrics.items() if _is_number(v)})
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [row]
        self._write_csv()
        self._write_png()
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
        engine.logger.info(f"Epoch {epoch}/{engine.state.max_epochs}: {shown}")

    def _write_csv(self) -> None:
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (int(v) if k == "epoch" else v) for k, v in row.items()})
        remove_stale_tmp(self.csv_path)
        atomic_write_text(self.csv_path, text.getvalue())

    def _write_png(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        columns = list(dict.fromkeys(k for row in self.rows for k in row if k not in ("epoch", "lr")))
        distance = [c for c in columns if "hd" in c.lower() or "hausdorff" in c.lower()]
        overlap = [c for c in columns if c not in distance and c != "loss"]
        panels = [("loss", ["loss"]), ("overlap", overlap)] + ([("distance (mm)", distance)] if distance else [])
        figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for axis, (title, names) in zip(axes[0], panels):
            for name in names:
                points = [(r["epoch"], r[name]) for r in self.rows if name in r and math.isfinite(r[name])]
                if points:
                    xs, ys = zip(*points)
                    axis.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=name)
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
            if names:
                axis.legend(fontsize=8)
        figure.tight_layout()
        remove_stale_tmp(self.png_path)
        try:
            atomic_write(self.png_path, lambda handle: figure.savefig(handle, format="png", dpi=100))
        finally:
            plt.close(figure)


def _is_number(value: Any) -> bool:
    if torch.is_tensor(value):
        return value.numel() == 1
    return isinstance(value, (int, float))


# --------------------------------------------------------------------------------------------
# metrics, progress, handler lists
# --------------------------------------------------------------------------------------------


class HausdorffDistance95(HausdorffDistance):
    """MONAI's ``HausdorffDistance`` handler at the 95th percentile, in millimetres.

    MONAI's handler calls the metric without ``spacing`` (distances in voxels); this one passes
    each case's voxel spacing, read from the label's affine (``MetaTensor.pixdim``).
    """

    def __init__(self, include_background: bool = False, percentile: float = 95, **kwargs: Any):
        super().__init__(include_background=include_background, percentile=percentile, **kwargs)

    def update(self, output: Sequence) -> None:
        if len(output) != 2:
            raise ValueError(f"output must have length 2, got {len(output)}.")
        y_pred, y = output
        for pred, label in zip(y_pred, y):  # lists of channel-first cases, or batch-first tensors
            spacing = None
            if isinstance(label, MetaTensor):
                dims = label.ndim - 1
                # a 2D image handled as a one-slice volume keeps its 2D affine: the extra axis has size 1
                spacing = ([float(s) for s in torch.as_tensor(label.pixdim).reshape(-1)] + [1.0] * dims)[:dims]
            self.metric_fn([pred], [label], spacing=spacing)


class ProgressBar:
    """ignite's tqdm ``ProgressBar`` as a MONAI handler (``attach(engine)`` only), showing the loss.

    ``enabled=False`` attaches nothing (``--progress_bar false`` for logs that are files).
    """

    def __init__(self, output_transform: Callable | None = None, enabled: bool = True, persist: bool = False):
        self.output_transform = output_transform
        self.enabled = enabled
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar as IgniteProgressBar

        IgniteProgressBar(persist=self.persist).attach(engine, output_transform=self.output_transform)


def handlers_for_rank(handlers: Sequence[Any]) -> list:
    """``handlers`` on rank 0; on other DDP ranks, without the ones that only write output.

    Kept on every rank: validation, LR schedule, early stopping, checkpoint loading and
    :class:`ResumableCheckpoint` (every rank must resume; only rank 0 writes), ``MetricsSaver``
    (it gathers file names across ranks). Dropped elsewhere: logging, TensorBoard, progress bar,
    best-model saving, training curves.
    """
    if rank() == 0:
        return list(handlers)
    output_only = (StatsHandler, TensorBoardStatsHandler, ProgressBar, BestModelSaver, TrainingCurves)
    return [h for h in handlers if not isinstance(h, output_only)]
