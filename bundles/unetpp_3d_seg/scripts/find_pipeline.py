"""Make ``import pipeline`` work for this bundle when the package is not installed.

The configs' code is the ``unetpp-pipeline`` package; every config imports this module first.
With the package installed (``pip install -e .`` or a wheel) it does nothing. Otherwise, when
the bundle sits inside a checkout of the package (``bundles/`` of the checkout, or a copy below
the checkout such as ``demo_output/bundle``), it puts the checkout's root on ``sys.path``.
That is what the model zoo's checks need: they run with the bundle folder on ``sys.path``
(``python -m monai.bundle`` from inside it, or ``ci/verify_bundle.py``) and with only the
packages that ``metadata.json`` lists installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent.parent
# what the configs import from the package (pipeline/__init__.py itself imports nothing)
CONFIG_MODULES = ("pipeline.settings", "pipeline.nets", "pipeline.transforms", "pipeline.inferers", "pipeline.handlers")


def checkout_root(bundle: Path = BUNDLE) -> Path | None:
    """The nearest folder above ``bundle`` with the package's source: ``pipeline/`` beside its ``pyproject.toml``."""
    for folder in bundle.parents:
        project = folder / "pyproject.toml"
        if (folder / "pipeline" / "__init__.py").is_file() and project.is_file():
            if 'name = "unetpp-pipeline"' in project.read_text(encoding="utf-8", errors="replace"):
                return folder
    return None


def ensure_pipeline_importable(bundle: Path = BUNDLE) -> None:
    """Import the package the configs use, from a clone above ``bundle`` when it is not installed.

    MONAI imports a config's modules as optional and reports a failed one only at the first
    expression that uses it ("Failed to evaluate ConfigExpression"), so this warns with the cause.
    """
    if importlib.util.find_spec("pipeline") is None:
        root = checkout_root(bundle)
        if root is None:
            warnings.warn(
                f"{bundle}: this bundle's code is the unetpp-pipeline package, which is not installed and "
                "not in a checkout above the bundle folder; install it (pip install -e <checkout> or the wheel)",
                stacklevel=2,
            )
            return
        sys.path.append(str(root))  # after everything else: only `pipeline` is looked up there
        importlib.invalidate_caches()
    try:
        for module in CONFIG_MODULES:
            importlib.import_module(module)
    except ImportError as error:
        warnings.warn(f"{bundle}: the unetpp-pipeline package cannot be imported: {error}; install its requirements "
                      "(pip install -e <checkout>)", stacklevel=2)


ensure_pipeline_importable()
