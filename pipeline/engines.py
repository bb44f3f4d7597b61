"""Small parts the bundle configs call where MONAI has no ready one.

Everything else in ``bundles/*/configs`` is plain MONAI (``SupervisedTrainer``,
``SupervisedEvaluator``, ``SlidingWindowInferer``, ``ValidationHandler``, ...). What is here:

* :func:`bundle_root` -- the bundle folder of the config being run, so a bundle works from any
  current directory (``python -m monai.bundle run --config_file bundles/<b>/configs/train.json``
  from the repository root as well as ``--config_file configs/train.json`` inside the bundle).
* :func:`atomic_save`, :class:`BestModelSaver`, :class:`ResumableCheckpoint` -- checkpoints that
  survive a ``SIGKILL`` at any moment. MONAI's ``CheckpointSaver`` builds ignite's ``DiskSaver`` with
  ``atomic=False`` and ignite's ``Checkpoint`` deletes the previous file *before* writing the next one,
  so a kill during a save can leave ``model.pt`` truncated or no checkpoint at all. Here the new file
  is written beside the old one and renamed over it (``os.replace``), and the training state
  (epoch, iteration, model, optimizer, scheduler, AMP scaler, best metric, early-stopping counter)
  is one file, ``latest.pt``, that training resumes from.
* :func:`load_weights` / :class:`WeightsLoader` -- ``weights_only=True`` loading with an error that
  says which architecture the checkpoint does not fit.
* :class:`TrainingCurves` -- per-epoch ``training_log.csv`` and ``training_curves.png``.
* :func:`final_head` -- the deepest (final) head of a deep-supervision output, for train metrics.
* :class:`HausdorffDistance95` -- HD95 in millimetres (MONAI's handler cannot pass the spacing).
* :class:`CPUAutocast` / :func:`with_cpu_autocast` -- optional bfloat16 autocast on CPU (MONAI's
  ``amp`` is CUDA float16 only).
* :class:`ProgressBar`, :func:`handlers_for_rank` -- a tqdm bar as a MONAI-style handler, and
  dropping output-only handlers on DDP ranks other than 0.
"""

from __future__ import annotations

import csv
import inspect
import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.handlers import HausdorffDistance, StatsHandler, TensorBoardStatsHandler
from monai.inferers import Inferer

__all__ = [
    "bundle_root",
    "rank",
    "atomic_save",
    "CheckpointMismatchError",
    "load_weights",
    "WeightsLoader",
    "BestModelSaver",
    "ResumableCheckpoint",
    "TrainingCurves",
    "final_head",
    "HausdorffDistance95",
    "CPUAutocast",
    "with_cpu_autocast",
    "ProgressBar",
    "handlers_for_rank",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# where the bundle is
# --------------------------------------------------------------------------------------------


def bundle_root(default: str | os.PathLike = ".") -> str:
    """Absolute path of the bundle whose config is being parsed.

    MONAI's ``ConfigWorkflow`` (behind ``python -m monai.bundle run``) knows the folder of the first
    config file; the bundle is its parent when that folder is ``configs/``, as MONAI itself assumes
    when it puts the bundle on ``sys.path``. It is found on the call stack, so the same config works
    whatever the current directory. Outside a ``ConfigWorkflow`` (a bare ``ConfigParser``, e.g. batch
    segmentation or ``ckpt_export``) this returns ``default``; set ``bundle_root`` explicitly there, as
    with any model-zoo bundle (``parser["bundle_root"] = path`` or ``--bundle_root path``).
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigWorkflow) and getattr(owner, "config_root_path", None) is not None:
                configs = Path(owner.config_root_path).resolve()
                return str(configs.parent if configs.name == "configs" else configs)
            frame = frame.f_back
    finally:
        del frame
    return str(Path(default).resolve())


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _unwrap(module: Any) -> Any:
    """The module inside ``DataParallel`` / ``DistributedDataParallel``."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return module.module if isinstance(module, parallel) else module


# --------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` so that ``path`` is always either the old or the new complete file.

    Writes ``.<name>.partial`` in the same folder, flushes it to disk, then renames it over ``path``
    (``os.replace`` is atomic on POSIX and Windows). A process killed mid-save leaves at most a stale
    ``.partial`` file, which the next save overwrites.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return path


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's tensors do not fit the network built from ``network_def``."""


def _describe(module: torch.nn.Module) -> str:
    """``UNetPlusPlus(spatial_dims=3, in_channels=1, ...)`` from the attributes the network keeps."""
    names = ("spatial_dims", "in_channels", "out_channels", "features", "depth", "deep_supervision")
    found = [f"{name}={getattr(module, name)}" for name in names if hasattr(module, name)]
    return f"{type(module).__name__}({', '.join(found)})"


def _torch_load(path: Path, map_location: Any = "cpu") -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointMismatchError(
            f"{path}: not loadable with weights_only=True ({err}); only plain state_dicts "
            "(tensors, numbers, strings, lists, dicts) are accepted"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointMismatchError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err


def _check_fit(state: Mapping[str, Any], module: torch.nn.Module, source: str) -> None:
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: {tuple(state[key].shape)} in the checkpoint vs {tuple(value.shape)} in the network"
        for key, value in expected.items()
        if key in state and torch.is_tensor(state[key]) and tuple(state[key].shape) != tuple(value.shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} tensors differ in shape (e.g. {mismatched[0]})")
    if missing:
        parts.append(f"{len(missing)} network tensors are missing from it (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its tensors are not in the network (e.g. {unexpected[0]})")
    raise CheckpointMismatchError(
        f"{source} does not fit the network {_describe(module)}: {'; '.join(parts)}. "
        "It was trained with another architecture: use the same network_def settings as for training "
        "(e.g. --network_def#features, --network_def#depth, --out_channels)."
    )


def load_weights(network: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> torch.nn.Module:
    """Load a state_dict file (``models/model.pt``) into ``network`` with ``weights_only=True``.

    Also accepts a training checkpoint (``latest.pt``: the weights are under ``"model"``). Raises
    :class:`CheckpointMismatchError` naming the network's architecture and the first differing
    tensor when the checkpoint was trained with another one; ``FileNotFoundError`` when absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trained weights; train the bundle first (it writes models/model.pt) or pass --ckpt_path"
        )
    state = _torch_load(path, map_location)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    module = _unwrap(network)
    _check_fit(state, module, str(path))
    module.load_state_dict(state)
    return network


class WeightsLoader:
    """Handler: load ``load_path`` into ``network`` when the engine starts (see :func:`load_weights`).

    The clear-error counterpart of MONAI's ``CheckpointLoader`` for evaluation and inference.
    """

    def __init__(self, load_path: str | os.PathLike, network: torch.nn.Module, map_location: Any = None):
        self.load_path = Path(load_path)
        self.network = network
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        location = self.map_location if self.map_location is not None else getattr(engine.state, "device", "cpu")
        load_weights(self.network, self.load_path, location)
        engine.logger.info(f"Loaded network weights from {self.load_path}")


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
        atomic_save(_unwrap(self.network).state_dict(), self.path)
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


class _EarlyStopState:
    """state_dict view of MONAI's ``EarlyStopHandler`` (its ignite ``EarlyStopping`` counter and best score)."""

    def __init__(self, early_stop: Any):
        self.early_stop = early_stop

    def _stopper(self):
        stopper = getattr(self.early_stop, "_handler", self.early_stop)
        if stopper is None or not hasattr(stopper, "state_dict"):
            raise RuntimeError("early stopping has no trainer yet: call set_trainer() in the config's 'initialize'")
        return stopper

    def state_dict(self) -> dict:
        # plain Python values only, so that the checkpoint loads with weights_only=True
        return {key: value.item() if hasattr(value, "item") else value for key, value in self._stopper().state_dict().items()}

    def load_state_dict(self, state: Mapping) -> None:
        self._stopper().load_state_dict(dict(state))


class ResumableCheckpoint:
    """Trainer handler: save the whole training state atomically and resume from it on start.

    At the end of every ``save_interval`` epochs (attach it after ``ValidationHandler`` and
    ``LrScheduleHandler`` so that their results are included) rank 0 writes ``<save_dir>/<filename>``
    holding ``save_dict``'s state_dicts (e.g. model, optimizer, lr_scheduler), the trainer's ignite
    state (epoch, iteration), the AMP grad scaler, the validator's best metric and epoch, and the
    early-stopping counter. When the trainer starts and the file exists (and ``resume`` is true),
    every rank loads it with ``weights_only=True`` and training continues with the next epoch. The
    ``max_epochs`` of the new run wins, so a finished run can be extended.

    Args:
        save_dir: folder of the checkpoint (``models/``).
        save_dict: objects with ``state_dict``/``load_state_dict``; a DDP model is unwrapped.
        validator: the ``SupervisedEvaluator`` whose best metric to keep across restarts.
        early_stop: MONAI ``EarlyStopHandler`` whose counter to keep across restarts.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        validator: Engine | None = None,
        early_stop: Any = None,
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
        self.early_stop = early_stop
        self.save_interval = save_interval
        self.resume = resume
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)

    def _objects(self, engine: Engine) -> dict:
        objects = {key: _unwrap(value) for key, value in self.save_dict.items()}
        objects["trainer"] = engine
        if getattr(engine, "scaler", None) is not None:
            objects["grad_scaler"] = engine.scaler
        if self.validator is not None:
            objects["validator"] = _BestMetricState(self.validator)
        if self.early_stop is not None:
            objects["early_stopping"] = _EarlyStopState(self.early_stop)
        return objects

    def save(self, engine: Engine) -> None:
        if rank() != 0:
            return
        atomic_save({key: obj.state_dict() for key, obj in self._objects(engine).items()}, self.path)
        engine.logger.info(f"Saved training state at epoch {engine.state.epoch}: {self.path}")

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            engine.logger.info(f"No training state at {self.path}: starting from scratch")
            return
        location = self.map_location if self.map_location is not None else getattr(engine.state, "device", "cpu")
        state = _torch_load(self.path, location)
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
                _check_fit(state[key], obj, f"{self.path} ['{key}']")
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
            with open(self.csv_path, newline="") as handle:
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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        partial = self.csv_path.with_name(f".{self.csv_path.name}.partial")
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: (int(v) if k == "epoch" else v) for k, v in row.items()})
        os.replace(partial, self.csv_path)

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
        partial = self.png_path.with_name(f".{self.png_path.stem}.partial.png")
        figure.savefig(partial, dpi=100)
        plt.close(figure)
        os.replace(partial, self.png_path)


def _is_number(value: Any) -> bool:
    if torch.is_tensor(value):
        return value.numel() == 1
    return isinstance(value, (int, float))


# --------------------------------------------------------------------------------------------
# metrics, inferers, handler lists
# --------------------------------------------------------------------------------------------


def final_head(pred: Any) -> Any:
    """The final (deepest) head of a deep-supervision output, which ``UNetPlusPlus`` returns first.

    For train metrics: in training mode the network returns a list of heads; a single tensor
    (no deep supervision) is returned unchanged.
    """
    return pred[0] if isinstance(pred, (list, tuple)) else pred


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


class CPUAutocast(Inferer):
    """Run ``inferer`` under ``torch.autocast("cpu", dtype)`` and return float32 outputs.

    MONAI's ``amp`` covers CUDA (float16 with a grad scaler); on CPUs with bfloat16 support this
    is the counterpart. Inputs on another device run unchanged.
    """

    def __init__(self, inferer: Inferer, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.inferer = inferer
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=self.dtype, enabled=inputs.device.type == "cpu"):
            outputs = self.inferer(inputs, network, *args, **kwargs)
        return _to_float32(outputs)


def _to_float32(outputs: Any) -> Any:
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(o) for o in outputs)
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    return outputs


def with_cpu_autocast(inferer: Inferer, enabled: bool) -> Inferer:
    """``inferer`` itself, or wrapped in :class:`CPUAutocast` when ``enabled`` (the ``cpu_bf16`` option)."""
    return CPUAutocast(inferer) if enabled else inferer


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
