"""DDL-CXR's X-ray pairs: what its latent diffusion model learns from and what it generates from.

* **Diffusion pairs**: every ordered pair (x0, x1) of AP X-rays of one ICU stay, both taken in the imaging window
  ([intime − 24 h, intime + 48 h]), x1 later than x0 by more than ``min_gap_hours`` (12 h) and with at least
  ``min_ehr_bins`` (6) hourly EHR bins holding an observation in [t0, t1]. The model learns x1's latent from
  x0's latent and the EHR of [t0, t1]; x1's CheXpert labels are its auxiliary targets.
* **Prediction X-ray**: per stay, x0 = the last AP X-ray in the imaging window up to the prediction time (48 h), and
  its age at that time (DDL-CXR's ``cha``: 48 − t0 hours).

As in DDL-CXR's ``pre_processing.py``: one image per study (its last AP image) and time in hours from intime.
A pair lies within one stay, so it never crosses subjects or splits (the cohort splits by subject); an EHR bin h
(hour [h, h + 1) of the stay's EHR tensor) lies in [t0, t1] when t0 < h + 1 and h <= t1.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ehrcxr.resources import CHEXPERT_LABELS

log = logging.getLogger("ehrcxr.pairs")

PAIR_COLUMNS = ["subject_id", "stay_id", "split", "x0_study_id", "x0_dicom_id", "x0_hours", "x0_path",
                "x1_study_id", "x1_dicom_id", "x1_hours", "x1_path", "gap_hours", "ehr_bins",
                *[f"x1_{label}" for label in CHEXPERT_LABELS]]
PREDICTION_COLUMNS = ["subject_id", "stay_id", "split", "x0_study_id", "x0_dicom_id", "x0_hours", "x0_path",
                      "x0_age_hours"]


def window_ap_images(cxr_studies: pd.DataFrame, window_hours: tuple[float, float] = (-24.0, 48.0)) -> pd.DataFrame:
    """One row per study of a stay: its last AP image taken in ``window_hours`` (from intime), sorted by stay and
    time."""
    missing = sorted({"stay_id", "subject_id", "study_id", "dicom_id", "view_position", "hours_from_intime", "path",
                      *CHEXPERT_LABELS} - set(cxr_studies.columns))
    if missing:
        raise ValueError(f"cxr_studies lacks column(s) {', '.join(missing)} (written by an older ehrcxr cohort stage?)")
    start, end = window_hours
    hours = cxr_studies["hours_from_intime"]
    images = cxr_studies[(cxr_studies["view_position"] == "AP") & (hours >= start) & (hours <= end)]
    images = images.sort_values(["stay_id", "hours_from_intime", "study_id", "dicom_id"], kind="stable")
    return images.drop_duplicates(["stay_id", "study_id"], keep="last").reset_index(drop=True)


def observed_bins(mask: np.ndarray) -> np.ndarray:
    """(stays, hours) bool: an hourly bin holds an observation of some variable (``mask`` (stays, hours,
    variables) of the EHR tensor)."""
    return np.asarray(mask).astype(bool).any(axis=2)


def window_bins(t0: np.ndarray, t1: np.ndarray, n_hours: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hourly bins h of [t0, t1] (bin h covers [h, h + 1): t0 < h + 1 and h <= t1) within [0, n_hours), as
    (first, stop) with stop > first, or stop == first when none lies in range."""
    n_hours = np.asarray(n_hours, dtype=np.int64)
    first = np.clip(np.floor(t0).astype(np.int64), 0, n_hours)  # bins h >= floor(t0) have h + 1 > t0
    stop = np.clip(np.floor(t1).astype(np.int64) + 1, 0, n_hours)  # bins h < floor(t1) + 1
    return np.minimum(first, stop), stop


def _bins_between(observed: np.ndarray, row: np.ndarray, t0: np.ndarray, t1: np.ndarray) -> np.ndarray:
    """Per pair, the observed hourly bins h of its stay (``row`` into ``observed``) in [t0, t1] (:func:`window_bins`)."""
    running = np.zeros((observed.shape[0], observed.shape[1] + 1), dtype=np.int64)
    np.cumsum(observed, axis=1, out=running[:, 1:])
    first, stop = window_bins(t0, t1, observed.shape[1])
    return running[row, stop] - running[row, first]


def diffusion_pairs(images: pd.DataFrame, stays: pd.DataFrame, stay_ids: np.ndarray, observed: np.ndarray, *,
                    min_gap_hours: float = 12.0, min_ehr_bins: int = 6) -> pd.DataFrame:
    """Every pair of :func:`window_ap_images` rows of one stay with x1 later than x0 by more than ``min_gap_hours``
    and at least ``min_ehr_bins`` observed EHR bins in [t0, t1] (``observed`` (stays, hours) in the order of
    ``stay_ids``, from the EHR tensor). Stays without an EHR row have no pairs. ``stays`` gives the split."""
    row_of = pd.Series(np.arange(len(stay_ids)), index=pd.Index(stay_ids))
    images = images[images["stay_id"].isin(row_of.index)].reset_index(drop=True)
    stay = images["stay_id"].to_numpy()
    bounds = np.flatnonzero(np.r_[True, stay[1:] != stay[:-1], True])
    first_index, second_index = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):  # all ordered pairs within each stay
        i, j = np.triu_indices(end - start, k=1)
        first_index.append(start + i)
        second_index.append(start + j)
    i = np.concatenate(first_index) if first_index else np.zeros(0, dtype=np.int64)
    j = np.concatenate(second_index) if second_index else np.zeros(0, dtype=np.int64)
    t0, t1 = images["hours_from_intime"].to_numpy()[i], images["hours_from_intime"].to_numpy()[j]
    bins = _bins_between(observed, row_of.loc[stay[i]].to_numpy(), t0, t1)
    keep = (t1 - t0 > min_gap_hours) & (bins >= min_ehr_bins)
    i, j, bins = i[keep], j[keep], bins[keep]
    x0, x1 = images.iloc[i].reset_index(drop=True), images.iloc[j].reset_index(drop=True)
    split = stays.set_index("stay_id")["split"].astype(str)
    pairs = pd.DataFrame({
        "subject_id": x0["subject_id"].to_numpy(), "stay_id": x0["stay_id"].to_numpy(),
        "split": split.loc[x0["stay_id"]].to_numpy(),
        **{f"x{k}_{name}": frame[column].to_numpy() for k, frame in ((0, x0), (1, x1))
           for name, column in (("study_id", "study_id"), ("dicom_id", "dicom_id"), ("hours", "hours_from_intime"),
                                ("path", "path"))},
        "gap_hours": (x1["hours_from_intime"] - x0["hours_from_intime"]).to_numpy(), "ehr_bins": bins,
        **{f"x1_{label}": x1[label].to_numpy() for label in CHEXPERT_LABELS}})
    return pairs[PAIR_COLUMNS]


def prediction_x0(images: pd.DataFrame, stays: pd.DataFrame, prediction_hour: float = 48.0) -> pd.DataFrame:
    """Per stay of ``stays`` with one, its last :func:`window_ap_images` image up to ``prediction_hour``, and the
    image's age at that hour."""
    earlier = images[images["hours_from_intime"] <= prediction_hour]
    last = earlier.drop_duplicates("stay_id", keep="last")
    last = last[last["stay_id"].isin(stays["stay_id"])]
    split = stays.set_index("stay_id")["split"].astype(str)
    return pd.DataFrame({
        "subject_id": last["subject_id"].to_numpy(), "stay_id": last["stay_id"].to_numpy(),
        "split": split.loc[last["stay_id"]].to_numpy(), "x0_study_id": last["study_id"].to_numpy(),
        "x0_dicom_id": last["dicom_id"].to_numpy(), "x0_hours": last["hours_from_intime"].to_numpy(),
        "x0_path": last["path"].to_numpy(),
        "x0_age_hours": prediction_hour - last["hours_from_intime"].to_numpy()})[PREDICTION_COLUMNS]


def split_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Rows per split (train, val, test order), zeros included."""
    counts = frame["split"].value_counts()
    return {split: int(counts.get(split, 0)) for split in ("train", "val", "test")}


def run_pairs(stays_path: str | Path, cxr_studies_path: str | Path, ehr_tensor_path: str | Path,
              out_pairs: str | Path, out_prediction: str | Path, params: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the diffusion pairs and the prediction X-rays (parquet) of the cohort, logging their counts per split.
    ``params``: ``window_hours``, ``min_gap_hours``, ``min_ehr_bins``, ``prediction_hour`` (config ``ddl_cxr.pairs``);
    the EHR tensor tells which hourly bins hold an observation (stays outside it have no pairs)."""
    from ehrcxr.data.ehr import load_ehr_tensor

    stays = pd.read_parquet(stays_path, columns=["stay_id", "subject_id", "split"])
    images = window_ap_images(pd.read_parquet(cxr_studies_path), tuple(params["window_hours"]))
    tensor = load_ehr_tensor(ehr_tensor_path)
    pairs = diffusion_pairs(images, stays, tensor["stay_id"].to_numpy(), observed_bins(tensor["mask"].to_numpy()),
                            min_gap_hours=params["min_gap_hours"], min_ehr_bins=params["min_ehr_bins"])
    prediction = prediction_x0(images, stays, params["prediction_hour"])
    log.info("AP studies in [intime %+g h, intime %+g h]: %d, of %d stays", *params["window_hours"],
             len(images), images["stay_id"].nunique())
    log.info("diffusion pairs (gap > %g h, >= %d observed EHR hours between): %s, from %d stays",
             params["min_gap_hours"], params["min_ehr_bins"], split_counts(pairs), pairs["stay_id"].nunique())
    log.info("prediction X-rays (last AP up to hour %g): %s; age at prediction: median %.1f h, IQR %.1f-%.1f h",
             params["prediction_hour"], split_counts(prediction), *np.nanpercentile(
                 prediction["x0_age_hours"], [50, 25, 75]) if len(prediction) else (np.nan,) * 3)
    for frame, path in ((pairs, out_pairs), (prediction, out_prediction)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
    return pairs, prediction
