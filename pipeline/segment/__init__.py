"""Batch volume segmentation: a folder (or datalist) of CT/MRI volumes in, masks and a report out.

Command line (``python -m pipeline segment ...``; ``--help`` lists every option)::

    python -m pipeline segment --bundle bundles/unetpp_3d_seg --input IN --output OUT \\
        [--mode accurate|fast --prune-level K] [--device cpu|cuda] [--precision fp32|bf16|fp16] \\
        [--format dicom-seg] [--format qa-png] [--overwrite] [--quiet] [--override ID=VALUE ...]

One module per job, in the order a case goes through them:

* :mod:`~pipeline.segment.cases` -- ``IN`` is a folder searched recursively with the one rule
  of :func:`pipeline.readers.list_images` (volume files, folders directly holding DICOM files),
  or an MSD-style datalist (``--section``, default ``test``). Ids are the file or series folder
  names, qualified by folder path (``siteA/ct.nii.gz`` -> ``siteA__ct``) and then numbered
  (``ct``, ``ct__2``) only where they collide.
* :mod:`~pipeline.segment.bundle` -- ``network_def``, ``preprocessing``, ``inferer`` and
  ``postprocessing`` parsed from the bundle's ``configs/inference.json`` with MONAI's
  ``ConfigParser`` (``--override`` uses the ``id#key=value`` syntax of ``monai.bundle run``);
  the number of classes comes from the config or ``metadata.json``; weights are loaded with
  ``weights_only=True``.
* :mod:`~pipeline.segment.run` -- a ``DataLoader`` reads and preprocesses each case in a
  background process, the network runs (under :class:`pipeline.inferers.AutocastInferer`), and
  each prediction is inverted onto its input's grid and written. With a CPU network the three
  take turns; with a GPU network, readers read ahead and a thread writes behind.
* :mod:`~pipeline.segment.writers` -- one :class:`OutputWriter` per output format, chosen by name
  from a registry: the NIfTI mask (always), ``dicom-seg``, ``qa-png``.
* :mod:`~pipeline.segment.records` -- ``records/<case>.json`` lists a finished case's outputs with
  SHA-256 digests; a rerun skips a case only when its record vouches for every output, the input
  is unchanged and the settings are the same. ``summary.csv``/``summary.json`` are built from them.
* :mod:`~pipeline.segment.dist` -- under ``torchrun`` rank ``r`` takes cases ``r, r + N, ...``.
* :mod:`~pipeline.segment.cli` -- the command line; exit code 0 all done, 1 some case failed,
  2 usage or setup error.
"""

from pipeline.segment.bundle import LoadedBundle, load_bundle, parse_override
from pipeline.segment.cases import Case, assign_case_ids, cases_from_datalist, discover_cases, shard
from pipeline.segment.cli import build_parser, main
from pipeline.segment.records import collect_rows, write_summary
from pipeline.segment.run import SegmentOptions, run_segmentation
from pipeline.segment.writers import WRITERS, OutputWriter, Prediction, register_writer

__all__ = [
    "Case",
    "discover_cases",
    "cases_from_datalist",
    "assign_case_ids",
    "shard",
    "load_bundle",
    "LoadedBundle",
    "parse_override",
    "SegmentOptions",
    "run_segmentation",
    "collect_rows",
    "write_summary",
    "OutputWriter",
    "Prediction",
    "WRITERS",
    "register_writer",
    "build_parser",
    "main",
]
