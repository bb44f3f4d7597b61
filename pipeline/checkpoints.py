"""Loading weights and training checkpoints, with errors that say what does not fit.

* :func:`load_checkpoint` -- ``torch.load(..., weights_only=True)``: a checkpoint is data, never code;
  an unreadable or pickled file is a :class:`CheckpointMismatchError` naming the file.
* :func:`check_fit` -- a state_dict against a network: names the architecture and the first
  differing tensor instead of PyTorch's list of every key.
* :func:`load_weights` / :class:`WeightsLoader` -- ``models/model.pt`` (or a training checkpoint)
  into a network, as a function (batch segmentation) and as a handler (evaluation, inference);
  given the config's ``model_settings``, they first check them against the settings the weights
  were trained with (:func:`pipeline.settings.check_settings`).

Saving lives in :mod:`pipeline.fileio` (``atomic_torch_save``) and :mod:`pipeline.handlers`.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events

from pipeline.settings import check_settings

__all__ = ["CheckpointMismatchError", "unwrap", "load_checkpoint", "check_fit", "load_weights", "WeightsLoader"]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint is unreadable, or its tensors do not fit the network built from ``network_def``."""


def unwrap(module: Any) -> Any:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` (its state_dict keys lack ``module.``)."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return module.module if isinstance(module, parallel) else module


def _describe(module: torch.nn.Module) -> str:
    """``UNetPlusPlus(spatial_dims=3, in_channels=1, ...)`` from the attributes the network keeps."""
    names = ("spatial_dims", "in_channels", "out_channels", "features", "depth", "deep_supervision")
    found = [f"{name}={getattr(module, name)}" for name in names if hasattr(module, name)]
    return f"{type(module).__name__}({', '.join(found)})"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """The content of a checkpoint file, loaded with ``weights_only=True``.

    Raises ``FileNotFoundError`` when absent and :class:`CheckpointMismatchError` (naming the file)
    when it holds pickled objects other than tensors and plain containers, or is truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointMismatchError(f"{path}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as handle:
        is_pickle = handle.read(1) == b"\x80"  # a pickle's PROTO opcode (torch.save's legacy format)
    if not zipfile.is_zipfile(path) and not is_pickle:
        raise CheckpointMismatchError(
            f"{path}: not a readable PyTorch checkpoint (truncated, or another kind of file: "
            "neither torch.save's zip format nor a pickle)"
        )
    try:
        with warnings.catch_warnings():
            # A legacy pickle gets a line about its protocol before our one-line verdict: noise.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # PyTorch's message is a page of advice to load unsafely; keep the line that names the object.
        culprit = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line or "GLOBAL" in line), "")
        raise CheckpointMismatchError(
            f"{path}: refused: it holds Python objects other than tensors ({culprit or 'not a plain state_dict'}); "
            "only plain state_dicts (tensors, numbers, strings, lists, dicts) are loaded, with weights_only=True"
        ) from err
    except Exception as err:  # noqa: BLE001 - text, truncated or foreign files raise OSError, KeyError, ...
        raise CheckpointMismatchError(
            f"{path}: not a readable PyTorch checkpoint (truncated, or another kind of file): {type(err).__name__}: {err}"
        ) from err


def check_fit(state: Mapping[str, Any], module: torch.nn.Module, source: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly ``module``'s keys and shapes.

    ``source`` names the checkpoint in the message (e.g. ``"models/latest.pt ['model']"``).
    """
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
        "It was trained with another architecture: use the same settings as for training "
        "(--features, --depth, --norm, --out_channels, or the network_def ids changed, e.g. --network_def#features; "
        "a trained bundle keeps its settings in models/settings.json)."
    )


def load_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    map_location: Any = "cpu",
    settings: Mapping[str, Any] | None = None,
    force: bool = False,
) -> torch.nn.Module:
    """Load a state_dict file (``models/model.pt``) into ``network`` with ``weights_only=True``.

    Also accepts a training checkpoint (``latest.pt``: the weights are under ``"model"``). With
    ``settings`` (the config's ``model_settings``), raises
    :class:`pipeline.settings.SettingsMismatchError` naming every id whose value differs from the
    ``settings.json`` beside the weights, unless ``force``. Raises
    :class:`CheckpointMismatchError` naming the network's architecture and the first differing
    tensor when the checkpoint was trained with another one; ``FileNotFoundError`` when absent.
    Returns ``network``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trained weights; train the bundle first (it writes models/model.pt) or pass --ckpt_path"
        )
    check_settings(settings, path, force)
    state = load_checkpoint(path, map_location)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    module = unwrap(network)
    check_fit(state, module, str(path))
    module.load_state_dict(state)
    return network


class WeightsLoader:
    """Handler: load ``load_path`` into ``network`` when the engine starts (see :func:`load_weights`).

    The clear-error counterpart of MONAI's ``CheckpointLoader`` for evaluation and inference;
    ``map_location`` defaults to the engine's device. ``settings`` and ``force`` as in
    :func:`load_weights`.
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        network: torch.nn.Module,
        map_location: Any = None,
        settings: Mapping[str, Any] | None = None,
        force: bool = False,
    ):
        self.load_path = Path(load_path)
        self.network = network
        self.map_location = map_location
        self.settings = settings
        self.force = force

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        location = self.map_location if self.map_location is not None else getattr(engine.state, "device", "cpu")
        load_weights(self.network, self.load_path, location, self.settings, self.force)
        engine.logger.info(f"Loaded network weights from {self.load_path}")
