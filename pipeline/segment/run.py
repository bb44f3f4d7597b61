"""The batch: read and preprocess in a background process, run the network, write.

With the network on the CPU, reading, the network and writing take turns; with the network on a
GPU, readers read ahead and a thread writes behind it (:func:`run_segmentation`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.checkpoints import CheckpointMismatchError
from pipeline.cpu import apply_thread_count, hand_back_freed_memory, keep_freed_memory
from pipeline.fileio import fsync_file, remove_stale_tmp, tmp_path_for
from pipeline.inferers import AutocastInferer, MirrorTTAInferer
from pipeline.readers import DataError
from pipeline.segment.bundle import LoadedBundle
from pipeline.segment.cases import Case
from pipeline.segment.records import base_row, input_fingerprint, output_paths, plan_case, redact, write_failure, write_record
from pipeline.segment.writers import Prediction, writers_for

__all__ = ["SegmentOptions", "root_cause", "run_segmentation"]

MAX_WRITES_IN_FLIGHT = 2  # predictions waiting for the writer thread (bounds memory)
# On a CPU, memory freed by a case is kept for the next one, unless the case's preprocessed image
# had more voxels than this (256^3): then its volume-sized buffers would stay with the main process
# while the reader reads the next case (a batch of two 512x512x200 CTs: peak 2.71 GB against 2.20 GB),
# and faulting in a window's working set again costs a long case only a few per cent.
KEEP_MEMORY_MAX_VOXELS = 1 << 24


@dataclasses.dataclass
class SegmentOptions:
    """Run options (the command line's, minus the model).

    ``formats``: extra outputs by writer name (``dicom-seg``, ``qa-png``); the NIfTI mask is always written.
    """

    output: Path
    overwrite: bool = False
    formats: Sequence[str] = ()
    precision: str = "fp32"
    tta: bool = False
    workers: int = 1
    quiet: bool = False
    rank: int = 0
    world_size: int = 1


def root_cause(err: BaseException) -> BaseException:
    """The error worth showing: MONAI wraps transform errors ("applying transform ..."), so take
    the first of our own errors in the chain (they name the file), else the innermost error."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    return next((e for e in chain if isinstance(e, (DataError, CheckpointMismatchError))), chain[-1])


def _reason(stage: str, err: BaseException) -> str:
    root = root_cause(err)
    message = str(root).strip().splitlines()
    text = message[0] if message else ""
    if isinstance(root, DataError):
        return f"{stage}: {text}"
    return f"{stage}: {type(root).__name__}: {text}"


class ReadTurn:
    """The main process's word to its reader: which case it may read now.

    With the network on the CPU, a reader that reads the next case while the network runs takes a
    core from it: its reads took up to 3 times longer, and on one machine the network, whose
    threads wait for each other at every operation, lost more time than the read costs (measured
    in docs/segment.md). So the reader waits for its turn: the main process hands it out when it
    has written a case and waits for the next.
    """

    def __init__(self):
        context = multiprocessing.get_context()  # DataLoader's own default
        self._allowed = context.Value("q", -1, lock=False)
        self._changed = context.Condition()

    def allow(self, index: int) -> None:
        """Let the reader read case ``index`` (and those before it)."""
        with self._changed:
            self._allowed.value = index
            self._changed.notify_all()

    def wait(self, index: int) -> None:
        """Block until case ``index`` may be read (in the reader); give up once the main process is gone."""
        parent = os.getppid()
        with self._changed:
            while self._allowed.value < index:
                self._changed.wait(timeout=1.0)
                if os.getppid() != parent:
                    raise RuntimeError("the segment process is gone")


class _PreprocessedCases(torch.utils.data.Dataset):
    """Loads and preprocesses a case; errors come back as data so one bad case never stops the loader.

    ``turn``: read a case only once the main process allows it (:class:`ReadTurn`), else at once.
    """

    def __init__(self, cases: Sequence[Case], preprocessing, spatial_dims: int | None, in_channels: int | None,
                 turn: ReadTurn | None = None):
        self.cases = list(cases)
        self.preprocessing = preprocessing
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.turn = turn

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        if self.turn is not None:
            self.turn.wait(index)
        start = time.perf_counter()
        try:
            data = self.preprocessing({"image": case.image})
            self._check(case, data["image"])
            # for the empty-mask warning, here: the main process drops the voxels after the network
            voxels = torch.as_tensor(data["image"]).as_subclass(torch.Tensor)
            data[CONSTANT_KEY] = voxels.numel() > 0 and bool(voxels.min() == voxels.max())
        except Exception as err:  # noqa: BLE001 - any failure of one case is reported, not raised
            return {"index": index, "error": _reason("read", err), "read_s": time.perf_counter() - start}
        return {"index": index, "data": data, "error": None, "read_s": time.perf_counter() - start}

    def _check(self, case: Case, image) -> None:
        meta = getattr(image, "meta", {})
        rank = len(np.atleast_1d(np.asarray(meta.get("spatial_shape", image.shape[1:]))))
        if self.spatial_dims == 3 and rank < 3:
            raise DataError(f"{case.first_path}: a {rank}D image, but the bundle's network is 3D (use a 2D bundle)")
        if self.in_channels is not None and image.shape[0] != self.in_channels:
            raise DataError(
                f"{case.first_path}: {image.shape[0]} channels after loading (a 4D volume?), "
                f"the network expects {self.in_channels}"
            )


def _passthrough(item):
    return item


class _Progress:
    """tqdm bar with ETA (rank 0, not --quiet), or one log line per case."""

    def __init__(self, total: int, initial: int, options: SegmentOptions):
        self.options = options
        self.total = total
        self.count = initial
        self.bar = None
        if not options.quiet and options.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="case", desc="segment", dynamic_ncols=True)

    def log(self, message: str) -> None:
        prefix = f"[rank {self.options.rank}] " if self.options.world_size > 1 else ""
        if self.bar is not None:
            self.bar.write(prefix + message, file=sys.stderr)
        else:
            print(prefix + message, file=sys.stderr, flush=True)

    def case_finished(self, row: dict) -> None:
        self.count += 1
        if row["status"] == "failed":
            self.log(f"{row['case_id']}: FAILED: {row['reason']}")
        elif self.bar is None and (self.options.quiet or self.options.rank != 0):
            timing = row.get("timings", {})
            self.log(
                f"[{self.count}/{self.total}] {row['case_id']}: done "
                f"(read {timing.get('read_s', 0):.2f} s, network {timing.get('infer_s', 0):.2f} s, write {timing.get('write_s', 0):.2f} s)"
            )
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Inverses that only move, crop or pad voxels, never interpolate: a mask discretised on the
# working grid and then inverted equals the mask of the inverted probabilities voxel for voxel
# (the padding, probability 0 in every channel, is background either way).
INDEX_ONLY_OPS = frozenset(
    {"Orientation", "CropForeground", "SpatialCrop", "CenterSpatialCrop", "Crop", "SpatialPad", "BorderPad", "DivisiblePad", "Pad", "Flip", "Rotate90"}
)
CONSTANT_KEY = "image_is_constant"  # set by the reader: every voxel of the preprocessed image equal
SLAB_VOXELS = 1 << 23  # voxels per slab when discretising (8 Mi: 32 MB of float32 per channel)


def _chain_parts(postprocessing) -> tuple | None:
    """``(activation, invert, match, discrete, rest)`` when ``postprocessing`` starts with the chain of
    :func:`pipeline.transforms.postprocessing` (activation, ``Invertd``, ``MatchInputDimsd``, threshold
    or argmax, all on ``pred``), else None."""
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd

    from pipeline.transforms import MatchInputDimsd

    transforms = list(postprocessing.transforms) if isinstance(postprocessing, Compose) else []
    if len(transforms) < 4:
        return None
    act, invert, match, discrete = transforms[:4]
    types = (Activationsd, Invertd, MatchInputDimsd, AsDiscreted)
    if not all(isinstance(t, k) for t, k in zip(transforms, types)) or any(list(t.keys) != ["pred"] for t in transforms[:4]):
        return None
    if list(invert.orig_keys) != ["image"] or discrete.to_onehot[0] is not None or discrete.rounding[0] is not None:
        return None
    if not (discrete.argmax[0] or discrete.threshold[0] is not None):
        return None
    return act, invert, match, discrete, Compose(transforms[4:])


def _discretise_first(postprocessing, image) -> tuple | None:
    """``(activation, invert, match, discrete, rest)`` of ``postprocessing`` when its
    discretisation may run before its inversion, i.e. it starts with the chain of
    :func:`pipeline.transforms.postprocessing` (:func:`_chain_parts`) and every operation
    ``image`` went through inverts by moving voxels (:data:`INDEX_ONLY_OPS`: no ``Spacingd``).
    Else None: the bundle's chain runs as it is.
    """
    chain = _chain_parts(postprocessing)
    ops = getattr(image, "applied_operations", None)
    if chain is None or ops is None or any(op.get("class") not in INDEX_ONLY_OPS or op.get("lazy") for op in ops):
        return None
    return chain


def _discretise(activation, discrete, logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(C, *spatial)`` -> class values ``(1 or C, *spatial)`` as uint8 (int32 above 256
    classes), activation and discretisation by slabs of the first spatial axis: one float32 slab at a time
    instead of whole-volume probabilities and their float32 mask."""
    dtype = torch.uint8 if logits.shape[0] <= 256 else torch.int32
    per_row = max(1, int(np.prod(logits.shape[2:], dtype=np.int64)) * logits.shape[0])
    step = max(1, SLAB_VOXELS // per_row)
    out = None
    for start in range(0, logits.shape[1], step):
        # contiguous, like the whole tensor, so the same (vectorised) kernels run on every voxel
        piece = logits[:, start : start + step].contiguous()
        values = discrete({"pred": activation({"pred": piece})["pred"]})["pred"]
        if out is None:
            out = torch.empty((values.shape[0], *logits.shape[1:]), dtype=dtype)
        out[:, start : start + step] = torch.as_tensor(values)  # exact: integral class values
    return out


RESAMPLE_SLAB_VOXELS = 1 << 20  # output voxels per slab when inverting a resampling (about 60 MB of grids)


def _resample_first(postprocessing, image) -> tuple | None:
    """``(chain, before, after)`` when the inversion of ``image``'s preprocessing may resample
    slab by slab (:func:`_inverted_resample`): the postprocessing starts with the chain of
    :func:`_chain_parts`, ``image`` went through exactly one resampling (``Spacingd``:
    ``SpatialResample``, eager, bilinear or nearest, MONAI's ``grid_sample`` path) and otherwise
    only through :data:`INDEX_ONLY_OPS`. ``before``/``after``: the preprocessing's transforms
    before and after its one ``Spacingd``. Else None.
    """
    from monai.config import USE_COMPILED
    from monai.transforms import Compose, Spacingd

    chain = _chain_parts(postprocessing)
    ops = getattr(image, "applied_operations", None)
    if chain is None or ops is None or USE_COMPILED or any(op.get("lazy") for op in ops):
        return None
    resamples = [n for n, op in enumerate(ops) if op.get("class") == "SpatialResample"]
    if len(resamples) != 1 or any(op.get("class") not in INDEX_ONLY_OPS for n, op in enumerate(ops) if n != resamples[0]):
        return None
    extra = ops[resamples[0]].get("extra_info", {})
    if extra.get("mode") not in ("bilinear", "nearest") or extra.get("padding_mode") not in ("zeros", "border", "reflection"):
        return None
    if extra.get("dtype") not in ("float64", "float32") or len(ops[resamples[0]].get("orig_size", ())) != 3:
        return None
    preprocessing = chain[1].transform
    if not isinstance(preprocessing, Compose):
        return None
    transforms = list(preprocessing.flatten().transforms)
    spacings = [n for n, t in enumerate(transforms) if isinstance(t, Spacingd)]
    if len(spacings) != 1:
        return None
    return chain, Compose(transforms[: spacings[0]]), Compose(transforms[spacings[0] + 1 :])


def _inverse(transforms, image):
    """``transforms``' inverse of ``image`` (a MetaTensor carrying its trace), as ``Invertd`` runs it."""
    from monai.transforms import allow_missing_keys_mode

    with allow_missing_keys_mode(transforms):
        return transforms.inverse({"image": image})["image"]


def _linspace_from_neg_one(steps: int, dtype: torch.dtype, align_corners: bool) -> torch.Tensor:
    """The base coordinates of ``torch.nn.functional.affine_grid`` along one axis (ATen's own formula)."""
    if steps <= 1:
        return torch.zeros(1, dtype=dtype)
    values = torch.linspace(-1, 1, steps, dtype=dtype)
    return values if align_corners else values * (steps - 1) / steps


def _inverted_resample(probs, discrete, dtype: torch.dtype):
    """Invert the resampling at the end of ``probs``' trace (a MetaTensor of probabilities on the
    resampled grid) and discretise, slab by slab along the last axis of the output grid.

    The same computation as MONAI's ``SpatialResample.inverse`` (``spatial_resample`` ->
    ``AffineTransform`` -> ``affine_grid`` + ``grid_sample``), with the same float64 matrices, but
    ``affine_grid``'s coordinates are made one slab at a time from ATen's own base grid and
    product (bit for bit the rows of the whole grid) and each slab is sampled, cast to float32
    and discretised at once: the dense full-size grid (3 float64 per voxel, and its base grid) and
    the float32 probabilities on the output grid are never allocated. Returns the class map
    (uint8, ``(1 or C, *output)``) as a MetaTensor with the trace and affine the inversion leaves.
    """
    from copy import deepcopy

    from monai.data import MetaTensor
    from monai.data.utils import AFFINE_TOL, to_affine_nd
    from monai.networks.utils import to_norm_affine
    from monai.transforms.utils_pytorch_numpy_unification import allclose
    from monai.transforms.utils import resolves_modes
    from monai.utils import convert_to_dst_type

    op = probs.applied_operations[-1]
    extra = op["extra_info"]
    spatial_size = torch.tensor([int(s) for s in op["orig_size"]])
    # spatial_resample, with the inverse's arguments: from the current affine to the recorded source's
    src_affine = to_affine_nd(3, probs.peek_pending_affine()).to(torch.float64)
    dst_affine = convert_to_dst_type(to_affine_nd(3, extra["src_affine"]), src_affine)[0]
    in_spatial_size = torch.tensor(probs.shape[1:4])
    xform = torch.as_tensor(np.linalg.solve(src_affine.numpy(), dst_affine.numpy()), dtype=torch.float64)
    unchanged = (allclose(src_affine, dst_affine, atol=AFFINE_TOL) and allclose(spatial_size, in_spatial_size)) or (
        allclose(xform, np.eye(4), atol=AFFINE_TOL) and allclose(spatial_size, in_spatial_size)
    )
    align_corners = extra.get("align_corners")
    align_corners = False if align_corners in (None, "none") else bool(align_corners)
    _, mode, padding_mode, _ = resolves_modes(extra["mode"], extra["padding_mode"])
    source = torch.as_tensor(probs).as_subclass(torch.Tensor)
    channels = source.shape[0]
    out_shape = tuple(int(s) for s in spatial_size)
    out = None
    if unchanged:  # MONAI returns the input as float32
        values = discrete({"pred": source.to(torch.float32)})["pred"]
        out = torch.as_tensor(values).to(dtype)
    else:
        source = source.to(torch.float64 if extra["dtype"] == "float64" else torch.float32).unsqueeze(0).contiguous()
        # AffineTransform(normalized=False, reverse_indexing=True).forward
        theta = to_norm_affine(
            affine=xform.to(source)[None].clone(), src_size=source.shape[2:], dst_size=out_shape, align_corners=align_corners
        )
        reverse = torch.as_tensor([2, 1, 0])
        theta[:, :3] = theta[:, reverse]
        theta[:, :, :3] = theta[:, :, reverse]
        theta = theta[:, :3].transpose(1, 2)
        depth, height, width = out_shape
        lin_x = _linspace_from_neg_one(width, source.dtype, align_corners)
        lin_y = _linspace_from_neg_one(height, source.dtype, align_corners).unsqueeze(-1)
        lin_z = _linspace_from_neg_one(depth, source.dtype, align_corners).unsqueeze(-1).unsqueeze(-1)
        step = max(1, RESAMPLE_SLAB_VOXELS // max(1, depth * height))
        for start in range(0, width, step):
            stop = min(width, start + step)
            base = torch.empty((1, depth, height, stop - start, 4), dtype=source.dtype)
            base[..., 0] = lin_x[start:stop]
            base[..., 1] = lin_y
            base[..., 2] = lin_z
            base[..., 3] = 1
            grid = base.view(1, -1, 4).bmm(theta).view(1, depth, height, stop - start, 3)
            del base
            piece = torch.nn.functional.grid_sample(source, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
            del grid
            values = torch.as_tensor(discrete({"pred": piece[0].to(torch.float32)})["pred"])
            del piece
            if out is None:
                out = torch.empty((values.shape[0], *out_shape), dtype=dtype)
            out[..., start:stop] = values
        del source
    meta = deepcopy(probs.meta)
    if not unchanged:  # TraceableTransform.track_transform_meta: affine @ xform
        meta["affine"] = src_affine @ to_affine_nd(3, xform, dtype=torch.float64)
    return MetaTensor(out, meta=meta, applied_operations=deepcopy(probs.applied_operations[:-1]))


def _resampled_mask(parts, data: dict, logits: torch.Tensor):
    """The mask of :func:`mask_on_input_grid` through :func:`_inverted_resample`; None when the trace
    does not come out as :func:`_resample_first` expects (then the bundle's chain runs)."""
    from copy import deepcopy

    from monai.data import MetaTensor

    (activation, invert, match, discrete, rest), before, after = parts
    image = data["image"]
    dtype = torch.uint8 if logits.shape[0] <= 256 else torch.int32
    probs = MetaTensor(
        torch.as_tensor(activation({"pred": logits})["pred"]).as_subclass(torch.Tensor),
        meta=deepcopy(image.meta),
        applied_operations=deepcopy(image.applied_operations),
    )
    probs = _inverse(after, probs)  # crops and pads after Spacingd, on the float32 probabilities
    if not probs.applied_operations or probs.applied_operations[-1].get("class") != "SpatialResample":
        return None
    pred = _inverse(before, _inverted_resample(probs, discrete, dtype))  # orientation etc., on the class map
    del probs
    return rest(match({**data, "pred": pred}))["pred"]


def mask_on_input_grid(bundle: LoadedBundle, data: dict, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Postprocess ``logits`` ``(C, *spatial)`` back onto the input's grid.

    Returns ``(mask, affine)``: class values with exactly the input's shape (uint8, or uint16
    for more than 255 classes) and the input's 4x4 affine. Raises when the bundle's
    postprocessing does not invert to the input grid.

    Memory: when the preprocessing inverts by moving voxels only (crop, orientation; no
    resampling), the mask is discretised on the working grid slab by slab and the uint8 class
    map is inverted (:func:`_discretise_first`), the same mask as the bundle's chain, which
    inverts float32 probabilities (C float32 arrays of the input's size, then their float32
    mask). When it resamples once (``Spacingd``), the resampling is inverted and discretised
    slab by slab (:func:`_resample_first`, :func:`_inverted_resample`), again the same mask.
    Otherwise the bundle's chain runs as it is.
    """
    image = data["image"]
    affine = np.asarray(image.meta["original_affine"], dtype=float)
    shape = tuple(int(s) for s in np.atleast_1d(np.asarray(image.meta["spatial_shape"])))
    chain = _discretise_first(bundle.postprocessing, image)
    resample = None if chain is not None else _resample_first(bundle.postprocessing, image)
    pred = None if resample is None else _resampled_mask(resample, data, logits)
    if pred is None and chain is None:
        pred = bundle.postprocessing({**data, "pred": logits})["pred"]
    elif pred is None:
        from monai.data import MetaTensor

        activation, invert, match, discrete, rest = chain
        # a MetaTensor, so that Invertd reads the trace from data["image"], as for the activation's output
        pred = MetaTensor(_discretise(activation, discrete, logits))
        pred = rest(match(invert({**data, "pred": pred})))["pred"]
    mask = torch.as_tensor(pred).detach().cpu().numpy()
    if mask.ndim == len(shape) + 1:
        mask = mask[0]
    if tuple(mask.shape) != shape:
        raise RuntimeError(f"inverted mask has shape {mask.shape}, the input {shape} (postprocessing must invert to the input grid)")
    inverted_affine = getattr(pred, "affine", None)
    if inverted_affine is not None and not np.allclose(np.asarray(inverted_affine, dtype=float), affine, atol=1e-3):
        raise RuntimeError("inverted mask's affine differs from the input's (postprocessing must invert to the input grid)")
    if not np.issubdtype(mask.dtype, np.integer):
        mask = np.rint(mask)
    return mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16, copy=False), affine


class _CaseWriter:
    """Turns one case's logits into its outputs and record (runs in the writer thread)."""

    def __init__(self, bundle: LoadedBundle, options: SegmentOptions, settings: dict, run_id: str):
        self.bundle = bundle
        self.options = options
        self.settings = settings
        self.run_id = run_id
        self.out = options.output
        self.writers = writers_for(options.formats)
        self.unrecorded: dict[str, dict] = {}  # failures whose record could not be written (full disk)

    def __call__(self, case: Case, data: dict, logits: torch.Tensor, timings: dict) -> dict:
        start = time.perf_counter()
        try:
            return self._write(case, data, logits, timings, start)
        except Exception as err:  # noqa: BLE001 - reported per case
            timings["write_s"] = time.perf_counter() - start
            return self.fail(case, _reason("write", err), timings, detail=traceback.format_exc())

    def _write(self, case: Case, data: dict, logits: torch.Tensor, timings: dict, start: float) -> dict:
        mask, affine = mask_on_input_grid(self.bundle, data, logits)
        prediction = Prediction(case, mask, affine, self.bundle.class_names)
        writers = [w for w in self.writers if w.applies_to(case)]
        finals = output_paths(self.out, case, writers)
        temps = {key: tmp_path_for(path) for key, path in finals.items()}
        for path in finals.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(path)
        try:
            for writer in writers:
                writer.write(prediction, temps[writer.key])
            for temp in temps.values():
                fsync_file(temp)
            voxel_ml = float(abs(np.linalg.det(affine[:3, :3])) / 1000.0)
            counts = np.bincount(mask.ravel(), minlength=max(self.bundle.class_names, default=1) + 1)
            timings["write_s"] = time.perf_counter() - start
            row = base_row(case, "done", "", self.run_id, self.options.rank, timings)
            row.update(
                shape=list(mask.shape),
                spacing_mm=[round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)][: mask.ndim],
                volumes_ml={name: round(float(counts[n]) * voxel_ml, 4) for n, name in sorted(self.bundle.class_names.items())},
                input_fingerprint=input_fingerprint(case.image),
                settings=self.settings,
            )
            notes = [w.not_applicable(case) for w in self.writers if not w.applies_to(case)]
            if notes:
                row["notes"] = "; ".join(notes)
            # geometry corrections the reader made (a resampled tilt or missing slice), then empty results
            warnings = list(case.notes) + _warnings(data.get(CONSTANT_KEY, False), mask, self.bundle.class_names)
            if warnings:
                row["warnings"] = warnings
            return write_record(self.out, row, finals, temps, self.options.overwrite)
        finally:
            for temp in temps.values():
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()

    def fail(self, case: Case, reason: str, timings: dict | None = None, detail: str = "") -> dict:
        row = base_row(case, "failed", reason, self.run_id, self.options.rank, timings)
        if detail:
            row["traceback"] = redact(detail, case)
        row = write_failure(self.out, row)
        if "unrecorded" in row:
            self.unrecorded[case.case_id] = row
        return row


def _warnings(constant_image: bool, mask: np.ndarray, class_names: dict[int, str]) -> list[str]:
    """What a reader of the summary must not miss although the case is done: empty results."""
    if mask.any() or constant_image:
        return []
    return [f"empty mask: no {'/'.join(class_names.values())} voxel predicted in a non-empty image"]


def _loader(dataset: _PreprocessedCases, first: int, workers: int, isolated: bool):
    """An iterator over ``dataset[first:]``; ``isolated`` (or a dataset read in turn): one worker
    holding one case at a time."""
    subset = torch.utils.data.Subset(dataset, range(first, len(dataset)))
    isolated = isolated or dataset.turn is not None
    workers = min(workers, 1) if isolated else workers
    loader = torch.utils.data.DataLoader(
        subset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_passthrough,
        prefetch_factor=(1 if isolated else 2) if workers > 0 else None,
    )
    # PyTorch's SIGCHLD handler raises "DataLoader worker ... exited" in the main thread
    # wherever it happens to be (in the network, in the middle of another case), which would
    # blame the wrong case. Without it, a dead reader is reported by the next `next()`.
    in_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGCHLD")
    previous = signal.getsignal(signal.SIGCHLD) if in_main else None
    iterator = iter(loader)
    if in_main and previous is not None:
        signal.signal(signal.SIGCHLD, previous)
    return iterator


def _plan(cases: Sequence[Case], writer: _CaseWriter, options: SegmentOptions, settings: dict) -> tuple[list, int, list]:
    """Split ``cases`` into (to do, number already finished, failure rows of cases refused up front)."""
    todo, existing, refused = [], 0, []
    for case in cases:
        decision, reason = plan_case(case, options.output, writer.writers, settings, options.overwrite)
        if decision == "existing":
            existing += 1
        elif decision == "failed":
            refused.append(writer.fail(case, f"skip: {reason}"))
        else:
            todo.append(case)
    return todo, existing, refused


def _inferer(bundle: LoadedBundle, options: SegmentOptions):
    """The bundle's inferer, under mirroring TTA if asked, under the run's autocast."""
    inferer = bundle.inferer
    if options.tta:
        inferer = MirrorTTAInferer(inferer, "sigmoid" if bundle.out_channels == 1 else "softmax")
    return AutocastInferer(inferer, options.precision)


def _predict(bundle: LoadedBundle, inferer, data: dict) -> torch.Tensor:
    """Logits ``(C, *spatial)`` on the CPU for one preprocessed case."""
    # A plain tensor: MetaTensor's per-op bookkeeping slows the network down (2x on small
    # networks) and Invertd only needs the trace kept on data["image"].
    batch = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).unsqueeze(0).to(bundle.device)
    with torch.no_grad():
        logits = inferer(batch, bundle.network)
    del batch
    return logits[0].float().cpu()


def _trace_only(image):
    """``image`` (a MetaTensor) without its voxels: its meta and trace, all the inversion reads."""
    from monai.data import MetaTensor

    if not isinstance(image, MetaTensor):
        return image
    return MetaTensor(torch.empty(0, dtype=image.dtype), meta=image.meta, applied_operations=image.applied_operations)


def run_segmentation(cases: Sequence[Case], bundle: LoadedBundle, options: SegmentOptions, settings: dict, run_id: str) -> dict:
    """Segment this rank's ``cases``: plan (skip finished ones), read (in a background process), infer, write.

    Reading always runs in a separate process, so a decoder that crashes on one file costs only
    that case. With the network on the CPU, one reader reads each case in turn, while the network
    waits, and the main process writes it (:func:`_takes_turns`). With the network on a GPU,
    ``workers`` processes read ahead (``workers=0``: one process holding one case at a time) and a
    thread writes behind.

    Returns batch statistics (``wall_s``, ``network_s``, ``input_wait_s``, counts, and
    ``unrecorded``: failures whose record could not be written). Per-case results are in
    ``OUT/records``.
    """
    if bundle.device.type == "cpu":
        apply_thread_count()
    writer = _CaseWriter(bundle, options, settings, run_id)
    todo, existing, refused = _plan(cases, writer, options, settings)
    progress = _Progress(len(cases), existing + len(refused), options)
    for row in refused:
        progress.log(f"{row['case_id']}: FAILED: {row['reason']}")
    stats = {"cases": len(cases), "existing": existing, "planned_failures": len(refused), "todo": len(todo)}
    start = time.perf_counter()
    # On a CPU, each case reuses the memory the one before freed (pipeline.cpu.keep_freed_memory):
    # handed back after every case, it had to be faulted in again by the first windows of the next,
    # which cost 10-27 % of a 192x192x96 case (docs/segment.md). The reader process starts outside
    # the block. After a large case the memory is handed back (KEEP_MEMORY_MAX_VOXELS).
    kept = keep_freed_memory() if _takes_turns(bundle.device) else contextlib.nullcontext()
    with kept, _writer_pool(bundle.device) as pool:
        network_s, wait_s = _segment_all(todo, bundle, _inferer(bundle, options), writer, pool, progress, options.workers)
    progress.close()
    stats.update(wall_s=time.perf_counter() - start, network_s=network_s, input_wait_s=wait_s, unrecorded=writer.unrecorded)
    return stats


class _WriteInTurn:
    """A ``ThreadPoolExecutor`` look-alike whose ``submit`` runs the write at once, in the calling thread."""

    def __enter__(self) -> "_WriteInTurn":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - handed over, as a thread's future would
            future.set_exception(err)
        return future


def _takes_turns(device: torch.device) -> bool:
    """Whether reading, the network and writing take turns (a network on the CPU) rather than
    overlap (a network on a GPU).

    Why: a network on the CPU keeps every core busy, and its threads wait for each other at the end
    of every operation. A writer thread's own PyTorch operations (argmax, the inverted transforms)
    start a second OpenMP team of as many threads, which slowed the network by more than the write
    itself takes; a reader process beside it takes a core (:class:`ReadTurn`; both measured in
    docs/segment.md). On a GPU the CPU is free while the network runs.
    """
    return torch.device(device).type == "cpu"


def _writer_pool(device: torch.device) -> ThreadPoolExecutor | _WriteInTurn:
    """Where the writes run: in turn with a CPU network, a background thread beside a GPU network."""
    if _takes_turns(device):
        return _WriteInTurn()
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-writer")


def _segment_all(todo: list, bundle: LoadedBundle, inferer, writer: _CaseWriter, pool: ThreadPoolExecutor | _WriteInTurn,
                 progress: _Progress, workers: int) -> tuple[float, float]:
    """The loop: next preprocessed case from the readers, the network, hand over to the writer.

    Returns the seconds spent in the network and waiting for input.
    """
    turn = ReadTurn() if _takes_turns(bundle.device) else None
    dataset = _PreprocessedCases(todo, bundle.preprocessing, bundle.spatial_dims, bundle.in_channels, turn)
    pending: deque[Future] = deque()
    network_s = wait_s = 0.0

    def harvest(limit: int) -> None:
        """Report finished writes; block while more than ``limit`` are pending."""
        while pending and (pending[0].done() or len(pending) > limit):
            progress.case_finished(pending.popleft().result())

    isolated = workers == 0
    iterator, expected = _loader(dataset, 0, max(workers, 1), isolated), 0
    while True:
        if turn is not None:
            turn.allow(expected)
        tick = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            break
        except RuntimeError as err:
            if "DataLoader worker" not in str(err) or expected >= len(todo):
                raise
            # A reader process died (a segfault in a DICOM decoder, killed for memory...). With
            # prefetching it may have held several cases, and results it had queued die with it,
            # so go on from the next expected case with one reader holding one case at a time:
            # if it dies again, that case is the culprit (a transient failure just passes).
            wait_s += time.perf_counter() - tick
            if isolated:
                reason = f"read: the reader process died on this case ({str(err).splitlines()[0]})"
                progress.case_finished(writer.fail(todo[expected], reason))
                expected += 1
            else:
                progress.log("a reader process died; trying its case once more, with one reader holding one case at a time")
                isolated = True
            iterator = _loader(dataset, expected, 1, True)
            continue
        wait_s += time.perf_counter() - tick
        expected = item["index"] + 1
        case, timings = todo[item["index"]], {"read_s": item["read_s"]}
        if item["error"] is not None:
            progress.case_finished(writer.fail(case, item["error"], timings))
            continue
        tick = time.perf_counter()
        try:
            logits = _predict(bundle, inferer, item["data"])
        except Exception as err:  # noqa: BLE001 - e.g. out of memory on one huge case
            timings["infer_s"] = time.perf_counter() - tick
            progress.case_finished(writer.fail(case, _reason("network", err), timings, detail=traceback.format_exc()))
            continue
        timings["infer_s"] = time.perf_counter() - tick
        network_s += timings["infer_s"]
        # Free the preprocessed volume (float32, shared with the reader) before the inversion allocates.
        voxels = math.prod(item["data"]["image"].shape[1:])  # spatial: channels do not count
        item["data"]["image"] = _trace_only(item["data"]["image"])
        pending.append(pool.submit(writer, case, item["data"], logits, timings))
        del logits, item
        harvest(MAX_WRITES_IN_FLIGHT)
        # written (in turn, inside run_segmentation's keep_freed_memory block): hand back before the next read
        if turn is not None and voxels > KEEP_MEMORY_MAX_VOXELS:
            hand_back_freed_memory()
    harvest(0)
    return network_s, wait_s
