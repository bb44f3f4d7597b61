"""What a bundle needs at run time besides its configs: where its inputs are.

The bundle configs call these so that a bundle folder copied anywhere runs with the standard
``python -m monai.bundle run`` commands from inside it (``bundle_root`` is ``"."``), with data
found relative to ``dataset_dir`` and every missing input reported in one clear message:

* :func:`require_datalist` -- training and evaluation stop before any work when the datalist
  is missing, saying which overrides point the bundle at data;
* :func:`inference_inputs`, :func:`check_inputs` -- inference segments the datalist's section
  when there is a datalist, else every image in ``dataset_dir`` (the model zoo's bundles glob
  ``dataset_dir`` the same way), and stops with a message when there is nothing to segment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sized

from pipeline.data import load_datalist
from pipeline.readers import DataError, list_images

__all__ = ["require_datalist", "inference_inputs", "check_inputs"]

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
