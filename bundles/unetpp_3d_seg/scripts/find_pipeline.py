"""Make ``import pipeline`` work for this bundle when the package is not installed.

The configs' code is the ``unetpp-pipeline`` package; every config imports this module first.
With the package installed (``pip install -e .`` or a wheel) it does nothing. Otherwise, when
the bundle sits inside a checkout of the package (``bundles/`` of the checkout, or a copy below
the checkout such as ``demo_output/bundle``), it puts the checkout's root first on ``sys.path``.
That is what the model zoo's checks need: they run with the bundle folder on ``sys.path``
(``python -m monai.bundle`` from inside it, or ``ci/verify_bundle.py``) and with only the
packages that ``metadata.json`` lists installed.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent.parent


def checkout_root(bundle: Path = BUNDLE) -> Path | None:
    """The nearest folder above ``bundle`` with the package's source: ``pipeline/`` beside ``pyproject.toml``."""
    for folder in bundle.parents:
        if (folder / "pipeline" / "__init__.py").is_file() and (folder / "pyproject.toml").is_file():
            return folder
    return None


def ensure_pipeline_importable(bundle: Path = BUNDLE) -> None:
    try:
        importlib.import_module("pipeline")
        return
    except ImportError as error:
        if error.name != "pipeline":  # the package is there but one of its requirements is not
            raise
    root = checkout_root(bundle)
    if root is None:
        # MONAI imports config modules as optional and would only say "No module named 'pipeline'"
        # at the first expression that uses it, so say here what is missing and how to get it.
        warnings.warn(
            f"{bundle}: this bundle's code is the unetpp-pipeline package, which is not installed and "
            "not in a checkout above the bundle folder; install it (pip install -e <checkout> or the wheel)",
            stacklevel=2,
        )
        return
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    importlib.import_module("pipeline")


ensure_pipeline_importable()
