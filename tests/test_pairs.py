"""DDL-CXR's X-ray pairs and prediction X-rays (ehrcxr.data.pairs) on hand-made studies, values worked out by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ehrcxr.data.pairs import diffusion_pairs, prediction_x0, split_counts, window_ap_images
from ehrcxr.resources import CHEXPERT_LABELS

STAYS = pd.DataFrame({"stay_id": [10, 11, 12, 13], "subject_id": [1, 1, 2, 3],
                      "split": ["train", "train", "test", "val"]})


def _studies() -> pd.DataFrame:
    rows = [  # stay, study, dicom, view, hours from intime
        (10, 100, "a", "AP", -30.0),  # before the window
        (10, 101, "b", "AP", -20.0),
        (10, 102, "c1", "AP", 0.5), (10, 102, "c2", "AP", 0.5),  # two AP images of one study: the last is kept
        (10, 103, "d", "PA", 20.0),  # not AP
        (10, 104, "e", "AP", 14.0),
        (10, 105, "f", "AP", 47.0),
        (11, 110, "g", "AP", 5.0), (11, 111, "h", "AP", 30.0),  # same subject, another stay
        (12, 120, "i", "AP", 1.0), (12, 121, "j", "AP", 13.5), (12, 122, "k", "AP", 25.5),
        (12, 123, "l", "AP", 49.0),  # after the window
        (13, 130, "m", "PA", 3.0),
    ]
    frame = pd.DataFrame(rows, columns=["stay_id", "study_id", "dicom_id", "view_position", "hours_from_intime"])
    frame["subject_id"] = frame["stay_id"].map(STAYS.set_index("stay_id")["subject_id"])
    frame["path"] = "files/" + frame["dicom_id"] + ".jpg"
    for k, label in enumerate(CHEXPERT_LABELS):
        frame[label] = (np.arange(len(frame)) + k) % 3 - 1.0  # -1, 0, 1: distinct per image and label
    return frame


def _observed() -> tuple[np.ndarray, np.ndarray]:
    observed = np.zeros((4, 48), dtype=bool)
    observed[0] = True  # stay 10: every hour
    observed[1, 10:15] = True  # stay 11: hours 10-14, 5 bins
    observed[2] = True
    return np.array([10, 11, 12, 13]), observed


def test_window_keeps_the_last_ap_image_of_each_study_in_the_window():
    images = window_ap_images(_studies())
    assert images["dicom_id"].tolist() == ["b", "c2", "e", "f", "g", "h", "i", "j", "k"]


def test_pairs_follow_the_gap_and_ehr_bin_rules():
    stay_ids, observed = _observed()
    pairs = diffusion_pairs(window_ap_images(_studies()), STAYS, stay_ids, observed)
    got = set(zip(pairs["x0_dicom_id"], pairs["x1_dicom_id"]))
    # stay 10: (b, c2) has a 20.5 h gap but only bin 0 in [-20, 0.5]; stay 11: 5 observed bins < 6;
    # stay 12: (j, k) is exactly 12 h apart (must exceed 12)
    assert got == {("b", "e"), ("b", "f"), ("c2", "e"), ("c2", "f"), ("e", "f"), ("i", "j"), ("i", "k")}
    row = pairs.set_index(["x0_dicom_id", "x1_dicom_id"])
    assert row.loc[("b", "e"), "ehr_bins"] == 15  # bins 0-14 (t0 before intime)
    assert row.loc[("c2", "e"), "ehr_bins"] == 15  # bin 0 holds hour 0.5; bins 0-14
    assert row.loc[("e", "f"), "ehr_bins"] == 34  # bins 14-47
    assert row.loc[("i", "j"), "ehr_bins"] == 13  # bin 0 ends at t0 = 1: bins 1-13
    assert row.loc[("i", "j"), "gap_hours"] == pytest.approx(12.5)
    # a pair lies within one stay: same stay, subject and split as its stay, never stay 10 with stay 11
    assert (pairs["split"] == pairs["stay_id"].map(STAYS.set_index("stay_id")["split"])).all()
    assert set(pairs["stay_id"]) == {10, 12}
    # x1's CheXpert labels travel with the pair
    studies = _studies().set_index("dicom_id")
    for label in CHEXPERT_LABELS:
        assert row.loc[("b", "e"), f"x1_{label}"] == studies.loc["e", label]
    assert split_counts(pairs) == {"train": 5, "val": 0, "test": 2}


def test_ehr_bin_threshold_is_inclusive():
    stay_ids, observed = _observed()
    pairs = diffusion_pairs(window_ap_images(_studies()), STAYS, stay_ids, observed, min_ehr_bins=5)
    assert ("g", "h") in set(zip(pairs["x0_dicom_id"], pairs["x1_dicom_id"]))


def test_stays_without_ehr_rows_have_no_pairs():
    stay_ids, observed = _observed()
    pairs = diffusion_pairs(window_ap_images(_studies()), STAYS, stay_ids[2:], observed[2:])
    assert set(pairs["stay_id"]) == {12}


def test_prediction_x0_is_the_last_ap_image_up_to_the_prediction_hour():
    x0 = prediction_x0(window_ap_images(_studies()), STAYS).set_index("stay_id")
    assert x0["x0_dicom_id"].to_dict() == {10: "f", 11: "h", 12: "k"}  # stay 13: PA only
    assert x0["x0_age_hours"].to_dict() == {10: 1.0, 11: 18.0, 12: 22.5}
    earlier = prediction_x0(window_ap_images(_studies()), STAYS, prediction_hour=24.0).set_index("stay_id")
    assert earlier["x0_dicom_id"].to_dict() == {10: "e", 11: "g", 12: "j"}
    assert earlier.loc[10, "x0_age_hours"] == 10.0


def test_missing_cohort_columns_are_named():
    with pytest.raises(ValueError, match="view_position"):
        window_ap_images(_studies().drop(columns="view_position"))
