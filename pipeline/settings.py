"""What a bundle needs at run time besides its configs: its model's settings, and its inputs.

**Settings.** The values that make a set of weights what it is -- preprocessing (``preset``,
``intensity``, ``pixdim``), patch size (``roi_size``), network shape (``spatial_dims``,
``in_channels``, ``out_channels``, ``features``, ``depth``, ``norm``) -- are top-level ids of
the bundle configs, collected in their ``model_settings`` id. They are kept in two files,
each a flat ``{id: value}`` object (so either also works as a MONAI config overlay):

* ``configs/plan.json``: the planned values (``python -m pipeline plan`` writes it); training
  starts from them (:func:`load_settings` without ``ckpt_dir``);
* ``models/settings.json``: the values the weights were trained with, written by
  :class:`SettingsWriter` when training starts, beside ``model.pt``, with the datalist's class
  ``labels``. Evaluation, inference, ``ckpt_export`` and batch segmentation read them first
  (:func:`load_settings` with ``ckpt_dir``), so no command after training repeats an override.
  ``python -m pipeline postprocess`` adds the connected-component rules it chose on the
  validation cases (:func:`save_postprocessing`, key ``postprocessing``; read by the configs'
  ``components`` id through :func:`postprocessing_rules`); like ``labels`` it is not a setting
  compared with an override.

Each setting id in the configs defaults to the saved value, e.g.
``"preset": "$@saved.get('preset', 'scale')"``. When weights are loaded under settings that
differ from the ones they were trained with (an override on the command line),
:func:`check_settings` raises :class:`SettingsMismatchError` naming every differing id, unless
``force`` (``--force True``).

**Inputs.** So that a bundle folder copied anywhere runs with the standard
``python -m monai.bundle run`` commands from inside it (``bundle_root`` is ``"."``):

* :func:`require_datalist` -- training and evaluation stop before any work when the datalist
  is missing, saying which overrides point the bundle at data;
* :func:`inference_inputs`, :func:`check_inputs` -- inference segments the datalist's section
  when there is a datalist, else every image in ``dataset_dir`` (the model zoo's bundles glob
  ``dataset_dir`` the same way), and stops with a message when there is nothing to segment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sized

import torch.distributed as dist
from ignite.engine import Engine, Events

from pipeline.bundle_sync import dumps
from pipeline.data import label_classes, load_datalist
from pipeline.fileio import atomic_write_text, read_json
from pipeline.readers import DataError, list_images

__all__ = [
    "PLAN_FILE",
    "SETTINGS_FILE",
    "SettingsMismatchError",
    "load_settings",
    "trained_settings",
    "differences",
    "check_settings",
    "datalist_labels",
    "SettingsWriter",
    "save_postprocessing",
    "postprocessing_rules",
    "require_datalist",
    "inference_inputs",
    "check_inputs",
    "SERVING_KEYS",
    "record_serving",
    "serving_overrides",
]

PLAN_FILE = os.path.join("configs", "plan.json")  # under bundle_root
SETTINGS_FILE = "settings.json"  # beside the weights, in ckpt_dir
LABELS = "labels"  # the datalist's class names, kept in SETTINGS_FILE (not a setting to compare)
POSTPROCESSING = "postprocessing"  # component rules chosen on validation (pipeline.postprocess), kept in SETTINGS_FILE
NOT_COMPARED = (LABELS, POSTPROCESSING)


class SettingsMismatchError(ValueError):
    """Weights are about to be used under settings other than the ones they were trained with."""


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples -> lists), so that saved and current values compare equal."""
    return json.loads(json.dumps(value))


def load_settings(bundle_root: str | os.PathLike, ckpt_dir: str | os.PathLike | None = None) -> dict:
    """The saved settings: ``configs/plan.json`` under ``bundle_root``, then (when ``ckpt_dir`` is
    given) the trained ``settings.json`` in ``ckpt_dir`` over it. ``{}`` when neither exists.
    """
    plan = Path(bundle_root) / PLAN_FILE
    settings = read_json(plan) if plan.is_file() else {}
    if ckpt_dir is not None:
        settings.update(trained_settings(Path(ckpt_dir) / "model.pt") or {})
    return settings


def trained_settings(weights: str | os.PathLike) -> dict | None:
    """The ``settings.json`` beside a weights file, or ``None`` when there is none."""
    path = Path(weights).parent / SETTINGS_FILE
    return read_json(path) if path.is_file() else None


def differences(current: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{id: (saved value, current value)}`` for the ids of ``current`` whose saved value differs."""
    return {
        key: (saved[key], current[key])
        for key in current
        if key in saved and key not in NOT_COMPARED and _plain(saved[key]) != _plain(current[key])
    }


def check_settings(current: Mapping[str, Any] | None, weights: str | os.PathLike, force: bool = False) -> list[str]:
    """Compare ``current`` (a config's resolved ``model_settings``) with the settings ``weights`` were trained with.

    Returns the differing ids (empty when they agree, or when there is nothing to compare:
    no ``current``, or no ``settings.json`` beside ``weights``). Raises
    :class:`SettingsMismatchError` naming every differing id with both values unless ``force``.
    """
    saved = trained_settings(weights)
    if not current or saved is None:
        return []
    differing = differences(current, saved)
    if differing and not force:
        listed = "; ".join(f"{key}: trained {old!r}, now {new!r}" for key, (old, new) in sorted(differing.items()))
        raise SettingsMismatchError(
            f"{weights} was trained with other settings ({Path(weights).parent / SETTINGS_FILE}): {listed}. "
            "Drop these overrides (the bundle reads the trained settings by itself), "
            "or pass --force True (segment: --force) to use the weights anyway."
        )
    return sorted(differing)


def datalist_labels(datalist: str | os.PathLike) -> dict[str, str] | None:
    """The datalist's ``labels`` (class value -> name, as in MSD ``dataset.json``), if it has them."""
    content = read_json(datalist, missing_ok=True) if os.path.isfile(datalist) else None
    if not isinstance(content, dict) or not isinstance(content.get(LABELS), dict):
        return None
    # MSD's {"1": "liver"} and nnU-Net v2's {"liver": 1} both become {"1": "liver"}
    return {str(value): name for name, value in label_classes(content).items()}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SettingsWriter:
    """Trainer handler: write the model's settings beside its weights when training starts.

    ``<ckpt_dir>/settings.json`` holds ``settings`` (the config's ``model_settings``) and the
    datalist's class ``labels``. Continuing a training run (``resume`` with ``latest.pt`` present)
    under other settings would mix two models in one set of weights: it raises
    :class:`SettingsMismatchError` naming the differing ids, unless ``force``. Only rank 0 writes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        settings: Mapping[str, Any],
        labels: Mapping[str, str] | None = None,
        resume: bool = True,
        force: bool = False,
        checkpoint: str = "latest.pt",
    ):
        self.path = Path(path)
        self.settings = _plain(dict(settings))
        self.labels = dict(labels) if labels else None
        self.resume = resume
        self.force = force
        self.checkpoint = self.path.parent / checkpoint

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        saved = read_json(self.path) if self.path.is_file() else None
        if saved is not None and self.resume and self.checkpoint.is_file():
            differing = differences(self.settings, saved)
            if differing and not self.force:
                listed = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in sorted(differing.items()))
                raise SettingsMismatchError(
                    f"{self.checkpoint} was trained with other settings ({self.path}): {listed}. "
                    "Pass the same settings to continue it, --resume False to start again with the new ones, "
                    "or --force True to continue anyway."
                )
        if _rank() == 0:
            content = dict(self.settings, **({LABELS: self.labels} if self.labels else {}))
            atomic_write_text(self.path, dumps(content) + "\n")
            engine.logger.info(f"Model settings written to {self.path}")


def save_postprocessing(ckpt_dir: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Keep the post-processing chosen for the weights in ``ckpt_dir`` in their ``settings.json``.

    ``record`` is what :func:`pipeline.postprocess.choose_rules` returns: ``{"classes": {value:
    rule}, ...}`` plus how it was chosen. Training writes ``settings.json`` afresh when it starts,
    so rules chosen for older weights never outlive them.
    """
    path = Path(ckpt_dir) / SETTINGS_FILE
    content = read_json(path) if path.is_file() else {}
    content[POSTPROCESSING] = _plain(dict(record))
    atomic_write_text(path, dumps(content) + "\n")
    return path


def postprocessing_rules(saved: Mapping[str, Any] | None) -> dict | None:
    """The per-class component rules in loaded settings (``None`` when none were chosen)."""
    record = (saved or {}).get(POSTPROCESSING) or {}
    return dict(record.get("classes") or {}) or None


_POINT_AT_DATA = (
    "pass --dataset_dir DIR (the folder the datalist's paths are relative to) and --datalist FILE "
    "(an MSD-style JSON; `python -m pipeline datalist build DIR` writes one)"
)


def require_datalist(datalist: str | os.PathLike, dataset_dir: str | os.PathLike) -> str:
    """``datalist`` if it is a file, else :class:`DataError` saying how to point the bundle at data."""
    if not os.path.isfile(datalist):
        raise DataError(f"no datalist at {os.path.abspath(datalist)} (dataset_dir {os.path.abspath(dataset_dir)}): {_POINT_AT_DATA}")
    return str(datalist)


def inference_inputs(datalist: str | os.PathLike, dataset_dir: str | os.PathLike, section: str = "test") -> list[dict]:
    """The images to segment: ``section`` of ``datalist`` when that file exists, else every image in ``dataset_dir``.

    Images in a folder follow :func:`pipeline.readers.list_images` (volume files and DICOM
    series folders). Returns ``[]`` when neither exists, so the config still parses (the
    model zoo's property checks build the dataset without data); :func:`check_inputs` stops
    the run then.
    """
    if os.path.isfile(datalist):
        return load_datalist(datalist, dataset_dir, section)
    if os.path.isdir(dataset_dir):
        return [{"image": str(path)} for path in list_images(dataset_dir)]
    return []


def check_inputs(dataset: Sized, datalist: str | os.PathLike, dataset_dir: str | os.PathLike, section: str = "test") -> int:
    """The number of images to segment; :class:`DataError` saying what to pass when there are none."""
    if len(dataset) == 0:
        if os.path.isfile(datalist):
            where = f"the {section!r} section of {os.path.abspath(datalist)} is empty"
        else:
            where = f"no datalist at {os.path.abspath(datalist)} and no images in {Path(dataset_dir).absolute()}"
        raise DataError(
            f"nothing to segment: {where}; pass --dataset_dir FOLDER (every image in it is segmented) "
            "or --datalist FILE (its --infer_section, default 'test')"
        )
    return len(dataset)


# How to serve the trained weights, chosen after training by ``python -m pipeline prune`` and kept
# in SETTINGS_FILE beside the model's settings (not model settings: never compared on load).
# ``mode``/``prune_level``/``head_weights`` are UNet++ eval-mode arguments; ``precision`` the
# autocast dtype that passed the bf16-against-fp32 agreement check (else "fp32").
SERVING_KEYS = ("mode", "prune_level", "head_weights", "precision")


def record_serving(ckpt_dir: str | os.PathLike, values: Mapping[str, Any]) -> Path:
    """Write the serving decision ``values`` (ids of :data:`SERVING_KEYS`) into ``<ckpt_dir>/settings.json``.

    The earlier decision's ids are replaced as a whole (a new choice of fast mode drops old
    ``head_weights``); every other id is kept. Retraining rewrites the file and so drops them.
    """
    unknown = sorted(set(values) - set(SERVING_KEYS))
    if unknown:
        raise ValueError(f"not serving settings: {unknown} (known: {list(SERVING_KEYS)})")
    path = Path(ckpt_dir) / SETTINGS_FILE
    content = read_json(path) if path.is_file() else {}
    content = {k: v for k, v in content.items() if k not in SERVING_KEYS}
    content.update(_plain(dict(values)))
    atomic_write_text(path, dumps(content) + "\n")
    return path


def serving_overrides(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Config overrides (``network_def#mode``, ...) for the serving decision kept in ``settings``."""
    settings = settings or {}
    overrides = {}
    if settings.get("mode") in ("accurate", "fast"):
        overrides["network_def#mode"] = settings["mode"]
        if settings["mode"] == "fast" and settings.get("prune_level") is not None:
            overrides["network_def#prune_level"] = int(settings["prune_level"])
        if settings["mode"] == "accurate" and settings.get("head_weights"):
            overrides["network_def#head_weights"] = [float(w) for w in settings["head_weights"]]
    return overrides
