"""Cell datasets: the stays, tensors and CXR availability of one (task, missing, seed) cell."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ehrcxr.data.cxr import load_cxr_cache
from ehrcxr.data.tasks import is_multiclass, task_labels, task_stays
from ehrcxr.batch import Batch

log = logging.getLogger("ehrcxr.data")

SPLITS = ("train", "val", "paired_test", "partial_test")
EVAL_SETS = ("paired_test", "partial_test")
_MISS_PATTERN = re.compile(r"^miss(\d+(?:\.\d*)?|\.\d+)$")



# Images are cached as uint8 and served to models as (x / 255 - PIXEL_MEAN) / PIXEL_STD.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def normalise_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S) pixels -> float32 (B, 1, S, S) tensor scaled as (x / 255 - 0.5) / 0.25."""
    images = torch.from_numpy(np.ascontiguousarray(pixels)).float().unsqueeze(1)
    return standardise(images / 255.0)


def standardise(images: torch.Tensor) -> torch.Tensor:
    """Images with values in [0, 1] -> the model input scale (x - 0.5) / 0.25."""
    return (images - PIXEL_MEAN) / PIXEL_STD


def parse_missing(missing: str) -> float | None:
    """'natural' -> None; 'miss<r>' -> r in [0, 1]; anything else raises."""
    if missing == "natural":
        return None
    match = _MISS_PATTERN.match(str(missing))
    if not match or not 0.0 <= float(match.group(1)) <= 1.0:
        raise ValueError(f"missing must be 'natural' or 'miss<r>' with r in [0, 1]; got {missing!r}")
    return float(match.group(1))


class StaySet(torch.utils.data.Dataset):
    """Tensors of a set of stays; items are row indices and ``collate`` turns a list of them into a Batch.

    Images are gathered from the (memory-mapped) cache only for the rows of a batch, or, after
    ``use_cxr_features``, taken from precomputed frozen-prefix features.
    """

    def __init__(self, name: str, stay_id: np.ndarray, ehr: np.ndarray, ehr_mask: np.ndarray,
                 ehr_length: np.ndarray, labels: np.ndarray, has_cxr: np.ndarray, cxr_hours: np.ndarray,
                 cxr_row: np.ndarray, images: np.ndarray | None, multiclass: bool = False):
        self.name = name
        self.multiclass = multiclass  # the labels are one-hot classes (softmax, cross-entropy), not independent
        self.stay_id = torch.as_tensor(np.asarray(stay_id, dtype=np.int64))
        self.ehr = torch.as_tensor(np.ascontiguousarray(ehr, dtype=np.float32))
        self.ehr_mask = torch.as_tensor(np.ascontiguousarray(ehr_mask, dtype=np.float32))
        self.ehr_length = torch.as_tensor(np.asarray(ehr_length, dtype=np.int64))
        self.labels = torch.as_tensor(np.ascontiguousarray(labels, dtype=np.float32))
        self.has_cxr = torch.as_tensor(np.asarray(has_cxr, dtype=np.float32))
        self.cxr_hours = torch.as_tensor(np.asarray(cxr_hours, dtype=np.float32))
        self.cxr_row = torch.as_tensor(np.asarray(cxr_row, dtype=np.int64))
        self.images = images
        self._features: torch.Tensor | None = None
        self._feature_position: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.stay_id.shape[0])

    def __getitem__(self, item: int) -> int:
        return int(item)

    def use_cxr_features(self, features: torch.Tensor, rows: np.ndarray | None = None) -> None:
        """Serve ``features[i]`` (precomputed frozen-prefix features) for cache row ``rows[i]`` instead
        of raw images; without ``rows`` the features are indexed by cache row directly."""
        n_rows = int(self.images.shape[0]) if self.images is not None else 0
        rows = np.arange(features.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.shape[0] != features.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {rows.shape[0]} cache rows")
        position = np.full(max(n_rows, int(rows.max()) + 1 if rows.size else 0), -1, dtype=np.int64)
        position[rows] = np.arange(rows.shape[0])
        needed = self.cxr_row.numpy()[self.has_cxr.numpy() > 0]
        if needed.size and (needed.max() >= position.shape[0] or (position[needed] < 0).any()):
            raise ValueError(f"{self.name}: precomputed CXR features miss cache rows this set needs")
        self._features = features
        self._feature_position = position

    def withheld(self, modality: str) -> "StaySet":
        """The same stays with one modality withheld at inference, as the model's missing-input convention
        sees it: 'cxr' = no X-ray (has_cxr 0, a zero image, cxr_hours 0, as a missing X-ray); 'ehr' = every EHR
        channel 0 (normalised values at the training mean, every observation mask 'unobserved'), lengths kept."""
        if modality not in ("cxr", "ehr"):
            raise ValueError(f"modality must be 'cxr' or 'ehr', got {modality!r}")
        no_cxr, no_ehr = modality == "cxr", modality == "ehr"
        copy = StaySet(self.name, self.stay_id, torch.zeros_like(self.ehr) if no_ehr else self.ehr,
                       torch.zeros_like(self.ehr_mask) if no_ehr else self.ehr_mask, self.ehr_length, self.labels,
                       torch.zeros_like(self.has_cxr) if no_cxr else self.has_cxr,
                       torch.zeros_like(self.cxr_hours) if no_cxr else self.cxr_hours,
                       torch.full_like(self.cxr_row, -1) if no_cxr else self.cxr_row, self.images, self.multiclass)
        copy._features, copy._feature_position = self._features, self._feature_position
        return copy

    def cxr_shape(self) -> tuple[int, ...]:
        """Shape of one served CXR item (C, H, W)."""
        if self._features is not None:
            return tuple(self._features.shape[1:])
        if self.images is not None:
            return (1, int(self.images.shape[1]), int(self.images.shape[2]))
        return (1, 1, 1)

    def collate(self, items: list[int]) -> Batch:
        """Build the Batch of the stays at positions ``items``. Images are served as uint8 pixels
        (B, 1, S, S), zeros where missing; the trainer normalises (and in training augments) them on the
        device (``ehrcxr.train.loop.prepare_batch``). Precomputed prefix features are served as they are."""
        index = torch.as_tensor(items, dtype=torch.long)
        has_cxr = self.has_cxr[index]
        rows = self.cxr_row[index].numpy()
        present = np.flatnonzero(has_cxr.numpy() > 0)
        if self._features is not None:
            dtype = self._features.dtype
        else:
            dtype = torch.uint8 if self.images is not None else torch.float32
        cxr = torch.zeros((len(items), *self.cxr_shape()), dtype=dtype)
        if present.size:
            if self._features is not None:
                cxr[present] = self._features[self._feature_position[rows[present]]]
            elif self.images is not None:
                wanted = rows[present]
                order = np.argsort(wanted, kind="stable")
                pixels = np.empty((present.size, *self.images.shape[1:]), dtype=np.uint8)
                pixels[order] = self.images[wanted[order]]
                cxr[present] = torch.from_numpy(pixels).unsqueeze(1)
        return Batch(ehr=self.ehr[index], ehr_mask=self.ehr_mask[index], ehr_length=self.ehr_length[index],
                     cxr=cxr, has_cxr=has_cxr, cxr_hours=self.cxr_hours[index], labels=self.labels[index],
                     stay_id=self.stay_id[index])


@dataclass
class CellData:
    """Label names and the StaySets ('train', 'val', 'paired_test', 'partial_test') of one cell."""

    task: str
    missing: str
    seed: int
    labels: list[str]
    splits: dict[str, StaySet]
    ehr_features: int
    images: np.ndarray | None = field(default=None, repr=False)

    def cxr_rows_needed(self) -> np.ndarray:
        """Sorted unique cache rows of every stay with a CXR in any set of the cell."""
        rows = [s.cxr_row.numpy()[s.has_cxr.numpy() > 0] for s in self.splits.values()]
        return np.unique(np.concatenate(rows)) if rows else np.array([], dtype=np.int64)

    def sizes(self) -> dict[str, int]:
        """Number of stays per set."""
        return {name: len(stay_set) for name, stay_set in self.splits.items()}


def _read_ehr(ehr_path: str | Path, stay_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """values+mask (N, T, F+V), mask (N, T, V) and length (N,) of ``stay_ids`` from an ehr/{task}.nc file."""
    with xr.open_dataset(ehr_path, engine="h5netcdf") as ds:
        for name in ("values", "mask", "length", "stay_id"):
            if name not in ds.variables:
                raise ValueError(f"{ehr_path}: missing variable {name!r}")
        file_ids = pd.Index(np.asarray(ds["stay_id"].values, dtype=np.int64))
        if not file_ids.is_unique:
            raise ValueError(f"{ehr_path}: duplicate stay_id values")
        position = file_ids.get_indexer(stay_ids)
        if (position < 0).any():
            absent = stay_ids[position < 0]
            raise ValueError(f"{ehr_path}: {absent.size} task stays have no EHR tensor (first stay_id {absent[0]})")
        values = np.asarray(ds["values"].values, dtype=np.float32)[position]
        mask = np.asarray(ds["mask"].values, dtype=np.float32)[position]
        length = np.asarray(ds["length"].values, dtype=np.int64)[position]
    if values.shape[:2] != mask.shape[:2]:
        raise ValueError(f"{ehr_path}: values {values.shape} and mask {mask.shape} disagree on (stay, hour)")
    if not np.isfinite(values).all():
        raise ValueError(f"{ehr_path}: 'values' holds non-finite numbers")
    if ((length < 1) | (length > values.shape[1])).any():
        bad = int(stay_ids[np.flatnonzero((length < 1) | (length > values.shape[1]))[0]])
        raise ValueError(f"{ehr_path}: 'length' must lie in [1, {values.shape[1]}] (stay_id {bad})")
    return np.concatenate([values, mask], axis=2), mask, length


def usable_cache_rows(index: pd.DataFrame, source: str | Path = "cxr index") -> pd.Series:
    """dicom_id -> cache row of the usable images of a cache index (status 'ok', row >= 0)."""
    usable = index[(index["status"] == "ok") & (index["row"] >= 0)]
    if not usable["dicom_id"].is_unique:
        raise ValueError(f"{source}: duplicate dicom_id among usable images")
    return pd.Series(usable["row"].to_numpy(np.int64), index=usable["dicom_id"].astype(str).to_numpy())


def cxr_cache_rows(stays: pd.DataFrame, index: pd.DataFrame, source: str | Path = "cxr index") -> np.ndarray:
    """Cache row of each stay's paired image (``cxr_dicom_id``; -1 when unpaired, absent from the cache or unusable)."""
    row_of = usable_cache_rows(index, source)
    dicom = stays["cxr_dicom_id"].astype("string")
    return dicom.map(row_of).astype("float64").fillna(-1).to_numpy().astype(np.int64)


def _cxr_rows(stays: pd.DataFrame, cxr_index_path: str | Path | None) -> np.ndarray:
    if cxr_index_path is None:
        return np.full(len(stays), -1, dtype=np.int64)
    return cxr_cache_rows(stays, pd.read_parquet(cxr_index_path, columns=["dicom_id", "row", "status"]),
                          cxr_index_path)


def load_cell_data(stays_path: str | Path, ehr_path: str | Path, task: str, missing: str, seed: int,
                   cxr_index_path: str | Path | None = None, cxr_images_path: str | Path | None = None
                   ) -> CellData:
    """Assemble the train/val/paired_test/partial_test StaySets of one cell.

    'natural': every task stay with its real CXR availability. 'miss<r>': only stays with a usable CXR;
    the CXR is withheld from int(round(r * N)) of the N train+val stays (np.random.default_rng(seed));
    test untouched. paired_test = test stays with a CXR, partial_test = all test stays. Without
    ``cxr_images_path`` the batches carry a (1, 1, 1) zero image.
    """
    rate = parse_missing(missing)
    labels = task_labels(task)
    stays = pd.read_parquet(stays_path)
    required = {"stay_id", "split", "cxr_dicom_id", "cxr_hours", *labels}
    if task in ("mortality", "length_of_stay"):
        required.add("in_mortality_task")
    if task == "length_of_stay":
        required.add("los_hours")
    absent = sorted(required - set(stays.columns))
    if absent:
        raise ValueError(f"{stays_path}: missing column(s) {absent}")
    stays = task_stays(stays, task)
    bad_split = ~stays["split"].isin(["train", "val", "test"])
    if bad_split.any():
        raise ValueError(f"{stays_path}: split must be train/val/test; stay_id "
                         f"{stays.loc[bad_split, 'stay_id'].iloc[0]} has {stays.loc[bad_split, 'split'].iloc[0]!r}")
    label_values = stays[labels].to_numpy(dtype=np.float64)
    if np.isnan(label_values).any() or not np.isin(label_values, [0.0, 1.0]).all():
        raise ValueError(f"{stays_path}: label columns {labels} must be 0/1 without missing values")
    if is_multiclass(task) and (label_values.sum(axis=1) != 1).any():
        bad = int(np.flatnonzero(label_values.sum(axis=1) != 1)[0])
        raise ValueError(f"{stays_path}: stay_id {stays['stay_id'].iloc[bad]} has {int(label_values[bad].sum())} of "
                         f"the one-hot {task} classes {labels} set (exactly one expected)")
    stay_ids = stays["stay_id"].to_numpy(np.int64)
    ehr, ehr_mask, length = _read_ehr(ehr_path, stay_ids)

    cxr_row = _cxr_rows(stays, cxr_index_path)
    images = None
    if cxr_images_path is not None:
        if cxr_index_path is None:
            raise ValueError("cxr_images_path given without cxr_index_path")
        images, _ = load_cxr_cache(cxr_images_path, cxr_index_path)
    has_cxr = cxr_row >= 0
    hours_from_intime = stays["cxr_hours"].to_numpy(dtype=np.float64)
    if (has_cxr & np.isnan(hours_from_intime)).any():
        bad = int(stay_ids[np.flatnonzero(has_cxr & np.isnan(hours_from_intime))[0]])
        raise ValueError(f"{stays_path}: stay_id {bad} has a CXR but no cxr_hours")
    cxr_hours = np.where(has_cxr, np.maximum(length - np.nan_to_num(hours_from_intime), 0.0), 0.0)

    split = stays["split"].to_numpy()
    is_fit = np.isin(split, ["train", "val"])
    available = has_cxr.copy()
    selected = np.ones(len(stays), dtype=bool)
    if rate is not None:
        selected = has_cxr.copy()
        candidates = np.flatnonzero(is_fit & has_cxr)
        n_withheld = int(round(rate * candidates.size))
        if candidates.size == 0:
            raise ValueError(f"cell {task}/{missing}: no train/val stays with a usable CXR")
        withheld = np.random.default_rng(seed).choice(candidates, size=n_withheld, replace=False)
        available[withheld] = False
        log.info("%s/%s seed %d: withheld the CXR of %d of %d train+val stays", task, missing, seed,
                 n_withheld, candidates.size)

    def stay_set(name: str, members: np.ndarray) -> StaySet:
        rows = np.flatnonzero(members)
        return StaySet(name, stay_ids[rows], ehr[rows], ehr_mask[rows], length[rows], label_values[rows],
                       available[rows], np.where(available[rows], cxr_hours[rows], 0.0),
                       np.where(available[rows], cxr_row[rows], -1), images, is_multiclass(task))

    is_test = split == "test"
    splits = {
        "train": stay_set("train", selected & (split == "train")),
        "val": stay_set("val", selected & (split == "val")),
        "paired_test": stay_set("paired_test", is_test & has_cxr),
        "partial_test": stay_set("partial_test", is_test),
    }
    data = CellData(task=task, missing=missing, seed=int(seed), labels=labels, splits=splits,
                    ehr_features=int(ehr.shape[2]), images=images)
    log.info("cell %s/%s seed %d: %s", task, missing, seed,
             ", ".join(f"{name} {len(s)} ({int(s.has_cxr.sum())} with CXR)" for name, s in splits.items()))
    return data
