"""The model: network, preprocessing, inferer and postprocessing parsed from a MONAI bundle, weights loaded."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.fileio import read_json, sha256
from pipeline.segment.cases import sanitize

__all__ = ["LoadedBundle", "parse_override", "load_bundle", "class_names_for"]


@dataclasses.dataclass
class LoadedBundle:
    """What segmentation needs from a bundle, parsed from its inference config.

    ``spatial_dims``, ``in_channels`` and ``out_channels`` come from the parsed config
    (``network_def``'s arguments) or the bundle's ``metadata.json``, never from attributes of
    the network module, so any MONAI network works. ``settings`` is the config's resolved
    ``model_settings`` (empty for a bundle without that id); ``config_sha256`` the content
    digest of each config file read, by its path relative to the bundle.
    """

    network: torch.nn.Module
    preprocessing: Any
    inferer: Any
    postprocessing: Any
    device: torch.device
    checkpoint: str
    checkpoint_sha256: str
    class_names: dict[int, str]
    spatial_dims: int | None
    in_channels: int | None
    out_channels: int
    settings: dict = dataclasses.field(default_factory=dict)
    config_sha256: dict = dataclasses.field(default_factory=dict)


def parse_override(text: str) -> tuple[str, Any]:
    """``id#key=value`` -> (id, value); the value is JSON, else a Python literal, else a string."""
    if "=" not in text:
        raise ValueError(f"--override needs ID=VALUE (e.g. network_def#features=[8,16,32]), got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ValueError(f"--override needs an id before '=', got {text!r}")
    for parse in (json.loads, ast.literal_eval):
        try:
            return key, parse(raw)
        except (ValueError, SyntaxError):
            pass
    return key, raw


def _strip_save_transforms(config: Any) -> Any:
    """Drop ``SaveImage``-like items from a postprocessing config (segment writes the masks itself).

    Handles ``pipeline.transforms.postprocessing`` (``output_dir`` -> None) and model-zoo style
    ``Compose`` lists of ``{"_target_": "SaveImaged", ...}``. Parsing either unchanged would
    create the bundle's output folder, outside ``OUT``.
    """
    if isinstance(config, dict):
        config = {k: _strip_save_transforms(v) for k, v in config.items()}
        target = str(config.get("_target_", ""))
        if target.endswith("postprocessing") and "output_dir" in config:
            config["output_dir"] = None
        return config
    if isinstance(config, list):
        return [
            _strip_save_transforms(item)
            for item in config
            if not (isinstance(item, dict) and "SaveImage" in str(item.get("_target_", "")))
        ]
    return config


def _without_save(postprocessing: Any) -> Any:
    """Second guard: remove SaveImage/SaveImaged instances from a parsed Compose."""
    from monai.transforms import Compose, SaveImage, SaveImaged

    if isinstance(postprocessing, Compose):
        kept = [t for t in postprocessing.transforms if not isinstance(t, (SaveImage, SaveImaged))]
        if len(kept) != len(postprocessing.transforms):
            return Compose(kept)
    return postprocessing


def _network_data_format(meta: dict, side: str) -> dict:
    """``metadata.json``'s ``network_data_format.<side>.<first item>`` (``image`` / ``pred``)."""
    items = (meta.get("network_data_format") or {}).get(side) or {}
    preferred = "image" if side == "inputs" else "pred"
    return items.get(preferred) or next(iter(items.values()), {}) if isinstance(items, dict) else {}


def _network_settings(parser, meta: dict) -> dict[str, int | None]:
    """``spatial_dims``, ``in_channels``, ``out_channels``: ``network_def``'s arguments, else metadata."""
    inputs, outputs = _network_data_format(meta, "inputs"), _network_data_format(meta, "outputs")
    from_meta = {
        "spatial_dims": len(inputs["spatial_shape"]) if isinstance(inputs.get("spatial_shape"), list) else None,
        "in_channels": inputs.get("num_channels"),
        "out_channels": outputs.get("num_channels"),
    }
    settings = {}
    for key, fallback in from_meta.items():
        value = parser.get_parsed_content(f"network_def#{key}") if f"network_def#{key}" in parser else fallback
        settings[key] = int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return settings


def class_names_for(out_channels: int, meta: dict, labels: dict | None = None) -> dict[int, str]:
    """Foreground class value -> name, from the trained ``labels`` or ``metadata.json``'s output ``channel_def``.

    ``labels`` (class value -> name, from the datalist, kept in ``models/settings.json`` by
    training) wins over the metadata when given.

    ``channel_def`` maps the class values of the written mask to names, as MONAI Label reads it
    (``{"0": "background", "1": "spleen"}``): with several output channels (softmax) channel
    ``k`` is class ``k``; one sigmoid channel is class 1. A ``channel_def`` without a
    ``"background"`` entry is read the older way, by output channel (a sigmoid's channel 0 is
    class 1). Missing names become ``foreground`` / ``class_<k>``; text in parentheses is
    dropped (``"liver (logit)"`` -> ``liver``).
    """
    channel_def = labels or _network_data_format(meta, "outputs").get("channel_def") or {}
    names = {}
    for key, value in channel_def.items() if isinstance(channel_def, dict) else ():
        with_number = str(key).strip()
        if with_number.isdigit():
            names[int(with_number)] = re.split(r"\s*\(", str(value))[0]
    by_channel = "background" not in (name.strip().lower() for name in names.values())
    if out_channels == 1:
        return {1: sanitize(names.get(0 if by_channel else 1) or "foreground")}
    return {k: sanitize(names.get(k) or f"class_{k}") for k in range(1, out_channels)}


def _find_checkpoint(parser, bundle: Path) -> str:
    for key in ("ckpt_path", "checkpoint", "checkpoint_path", "model_path"):
        if key in parser:
            value = parser.get_parsed_content(key)
            if isinstance(value, (str, os.PathLike)):
                return str(value)
    return str(bundle / "models" / "model.pt")


def load_bundle(
    bundle: str | os.PathLike,
    config_files: Sequence[str] = ("configs/inference.json",),
    overrides: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
    force: bool = False,
) -> LoadedBundle:
    """Parse the network, preprocessing, inferer and postprocessing from a bundle and load its weights.

    Args:
        bundle: the bundle folder (``bundle_root``).
        config_files: config files relative to ``bundle`` (later ones override earlier ones).
        overrides: ``{"id#key": value}`` applied after reading, e.g. ``{"network_def#mode": "fast"}``.
        checkpoint: weights file; default: the config's ``ckpt_path`` or ``models/model.pt``. The
            settings it was trained with are read from beside it (``ckpt_dir`` is its folder).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default: the config's ``device``.
        force: use the weights even when the resolved ``model_settings`` differ from the ones they
            were trained with (otherwise :class:`pipeline.settings.SettingsMismatchError`).
    """
    from monai.bundle import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    from pipeline.checkpoints import load_weights
    from pipeline.settings import LABELS, trained_settings

    bundle = Path(bundle)
    files = [str(f if Path(f).is_absolute() else bundle / f) for f in config_files]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"bundle config {path} not found (is --bundle a MONAI bundle folder?)")
    parser = ConfigParser()
    parser.read_config(files if len(files) > 1 else files[0])
    meta_path = bundle / "configs" / "metadata.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    if meta:
        parser.read_meta(str(meta_path))
    parser["bundle_root"] = str(bundle)
    if checkpoint is not None:  # the trained settings are read from beside the weights used
        for key, value in (("ckpt_dir", os.path.dirname(os.path.abspath(checkpoint))), ("ckpt_path", os.path.abspath(checkpoint))):
            if key in parser:
                parser[key] = value
    for key, value in (overrides or {}).items():
        top = ReferenceResolver.normalize_id(key).split(ReferenceResolver.sep)[0]
        if top not in parser:
            raise KeyError(f"override {key!r}: the bundle config has no id {top!r} (a typo?)")
        parser[key] = value
    if device is not None:
        parser["device"] = f"$torch.device({str(device)!r})"
    missing = [key for key in ("network_def", "preprocessing", "inferer") if key not in parser]
    if missing:
        raise KeyError(f"{files[-1]}: the config has no {', '.join(missing)} (needed to segment)")
    if "postprocessing" in parser:
        parser["postprocessing"] = _strip_save_transforms(parser["postprocessing"])
    settings = _network_settings(parser, meta)
    if settings["out_channels"] is None:
        raise KeyError(
            f"{files[-1]}: cannot tell the network's number of output channels; give network_def an "
            "out_channels argument or metadata.json network_data_format.outputs.pred.num_channels"
        )

    resolved_device = torch.device(parser.get_parsed_content("device")) if "device" in parser else torch.device("cpu")
    network = parser.get_parsed_content("network_def")
    checkpoint = checkpoint or _find_checkpoint(parser, bundle)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: no trained weights; train the bundle first or pass --checkpoint PATH")
    model_settings = parser.get_parsed_content("model_settings") if "model_settings" in parser else {}
    # weights_only=True; clear errors for other settings (unless force) and another architecture
    load_weights(network, checkpoint, settings=model_settings, force=force)
    network = network.to(resolved_device).eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    if "postprocessing" in parser:
        postprocessing = _without_save(parser.get_parsed_content("postprocessing"))
    else:
        from pipeline.transforms import postprocessing as default_postprocessing

        postprocessing = default_postprocessing(preprocessing, settings["out_channels"])
    return LoadedBundle(
        network=network,
        preprocessing=preprocessing,
        inferer=inferer,
        postprocessing=postprocessing,
        device=resolved_device,
        checkpoint=os.path.abspath(checkpoint),
        checkpoint_sha256=sha256(checkpoint),
        class_names=class_names_for(settings["out_channels"], meta, (trained_settings(checkpoint) or {}).get(LABELS)),
        spatial_dims=settings["spatial_dims"],
        in_channels=settings["in_channels"],
        out_channels=settings["out_channels"],
        settings=json.loads(json.dumps(model_settings)),
        config_sha256={os.path.relpath(path, bundle): sha256(path) for path in files},
    )
